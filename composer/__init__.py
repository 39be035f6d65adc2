"""HOW ANSWERS COMBINE: single expert, k experts + aggregate, merged adapters, mixtures, stitching.

Query-level plans, each ``execute(decision, request, engine) -> Completion`` (``composer.base``):

- ``single.Single``        the router's top expert answers alone
- ``ensemble.Ensemble``    k experts in one batched call, then majority / weighted vote or an
                           aggregator expert (Symbolic-MoE)
- ``merge.Merged``         the experts merged into one adapter (task arithmetic, TIES, DARE in ΔW
                           space; ``linear_factors`` in factor space), cached on disk
- ``stitch.Stitch``        a compositional request split into steps, each routed to its expert

Also ``merge.merge_adapters`` and ``lorahub`` (gradient-free LoraHub composition), and
``molora`` (the token-level mixture layer the hf engine installs). Nothing heavy is imported here.
"""
