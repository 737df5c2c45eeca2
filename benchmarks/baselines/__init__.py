"""Methods FlattenGPT is compared with at equal size; benchmark code, not the library's API.

ShortGPT's block removal lives in ``fxflatten.passes.remove`` and ``benchmarks.prune_ablation``;
this package adds LaCo-style layer collapse, width-only pruning with the same prune pass, and the
PyPI peer ``torch-pruning``.
"""
