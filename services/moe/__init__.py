"""Strategies: named (router, composer, params) triples over the registered experts, and
``evaluate(strategy, suite, split)``."""
