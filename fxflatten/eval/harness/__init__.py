"""Zero-shot evaluation through lm-evaluation-harness (the ``eval`` extra) of graphs in memory.

``zero_shot`` runs named lm-eval tasks on a captured or compressed graph through ``GraphLM``;
``fxflatten_next_sentence`` is a small multiple-choice task shipped here (built from the default
evaluation text), so an accuracy is available offline. Nothing here imports lm-eval until a
task is run, so the package imports without the extra.
"""

from fxflatten.eval.harness.next_sentence import TASK
from fxflatten.eval.harness.zero_shot import TaskScore, require_lm_eval, zero_shot

__all__ = ["TASK", "TaskScore", "require_lm_eval", "zero_shot"]
