"""Zero-shot accuracy of a graph on lm-evaluation-harness tasks, evaluated in memory."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from torch.fx import GraphModule
from transformers import PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError
from fxflatten.eval.harness.next_sentence import TASK

#: Where the shipped task YAML lives; lm-eval scans it for local tasks.
TASK_DIR = Path(__file__).parent
INSTALL_HINT = "pip install 'fxflatten[eval]'"


@dataclass(frozen=True)
class TaskScore:
    """Accuracy on one task: plain, length-normalised (when the task has it), its standard error."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    samples: int


def require_lm_eval() -> None:
    """Fail with one line naming the install command when lm-eval is missing (it is an extra)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FxflattenError(f"zero-shot tasks need lm-evaluation-harness: {INSTALL_HINT}") from None


def zero_shot(graph: GraphModule, tokenizer: PreTrainedTokenizerBase, tasks: list[str] | None = None,
              limit: int | None = None, batch_size: int = 16, progress: bool = False) -> list[TaskScore]:
    """Zero-shot accuracy of ``graph`` on ``tasks`` (default: the shipped next-sentence task).

    Only when a task other than the shipped one is named does lm-eval index its own task
    library (thousands of YAML files, seconds) and fetch that task's data set.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fxflatten.eval.harness.lm import GraphLM

    tasks = tasks or [TASK]
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=tasks != [TASK])
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FxflattenError(f"unknown lm-eval task {unknown[0]!r}{hint}")
    model = GraphLM(graph, tokenizer, batch_size=batch_size, progress=progress)
    output = simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    scores = []
    for task in tasks:
        metrics = output["results"][task]
        scores.append(TaskScore(
            task, metrics["acc,none"], _number(metrics.get("acc_stderr,none")), metrics.get("acc_norm,none"),
            int(output["n-samples"][task]["effective"]),
        ))
    return scores


def _number(value: object) -> float | None:
    """lm-eval writes "N/A" where it has no standard error."""
    return float(value) if isinstance(value, (int, float)) else None
