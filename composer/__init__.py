"""HOW ANSWERS COMBINE: single expert, k experts + aggregate, merged adapters, mixtures, stitching."""
