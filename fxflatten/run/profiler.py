"""Time and peak memory of each step of a run (load, select, flatten, prune, ...), for the
report and the closing table; a step that runs out of memory is named in a one-line error."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import torch

from fxflatten.errors import FxflattenError
from fxflatten.tables import format_table


@dataclass
class Step:
    """One measured step: its wall time and the process's peak RSS while it ran."""

    name: str
    seconds: float
    peak_rss_mib: float


@dataclass
class Profiler:
    """Records each ``with profiler("name"):`` block's wall time and the process's peak RSS in it.

    RSS is sampled every 20 ms on a background thread: the peak of the whole process while the
    step ran, which is what decides whether a run fits in memory. Running out of device or host
    memory in a step raises :class:`FxflattenError` naming the step and what to shrink.
    """

    done: list[Step] = field(default_factory=list)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        process = psutil.Process()
        peak = [process.memory_info().rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], process.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not out_of_memory(error):
                raise
            raise FxflattenError(
                f"out of memory during {name} ({str(error).splitlines()[0][:160]}); pass fewer --samples or a shorter "
                "--seq-len, or run where there is more memory (--device cpu or another GPU)") from error
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], process.memory_info().rss)
            self.done.append(Step(name, time.perf_counter() - start, peak[0] / 2**20))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {s.name: {"seconds": round(s.seconds, 3), "peak_rss_mib": round(s.peak_rss_mib, 1)} for s in self.done}

    def table(self) -> str:
        return format_table(["step", "seconds", "peak RSS MiB"], [[s.name, s.seconds, s.peak_rss_mib] for s in self.done])


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failing: CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError (a failed host allocation that the kernel refused rather than killing us)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
