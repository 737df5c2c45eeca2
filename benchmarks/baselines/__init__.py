"""Methods FlattenGPT is compared with at equal size; benchmark code, not the library's API.

ShortGPT's block removal lives in ``fxflatten.passes.remove`` and ``benchmarks.prune_ablation``;
this package adds ReplaceMe and LinearPatch (a removed span bridged by one fitted linear map,
found by ``span``), LaCo-style layer collapse and the PyPI peer ``torch-pruning``; width-only
pruning with the same prune pass is ``fxflatten.plans.width_plans``.
"""
