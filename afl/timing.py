"""Wall-clock accounting helpers.

`CompileClock` separates JAX's tracing and compilation from execution: JAX
reports the duration of every trace, lowering and backend compile through
`jax.monitoring`, at the moment it ends; the clock keeps each as the time
interval [end - duration, end] and counts the length of their union while
it is open, so a training loop can report `wall_time_s` (execution) and
`compile_time_s` without running twice. The union, not the sum: events
that overlap in time (a trace holding an inner one, compiles on several
threads) count their common time once.

What it cannot separate: JAX dispatches asynchronously, so a function
already dispatched runs while the next one compiles, and that execution
is hidden inside the compile time; a round that compiles reports less
than its work (the first round of the 1/16-width DCNN: 0.05 s against
0.46 s warm). Where per-round times matter, time a warm run
(`experiments.fig6`).
"""

import bisect
import threading
import time

import jax
import numpy as np

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_open_clocks: list["CompileClock"] = []
_lock = threading.Lock()


def _on_event(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in _COMPILE_EVENTS:
    end = time.perf_counter()
    with _lock:
      for clock in _open_clocks:
        clock.add(end - duration, end)


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileClock:
  """Context manager: `seconds` spent compiling while it is open (the
  length of the union of the compile events' intervals)."""

  def __init__(self):
    self._starts, self._ends = [], []  # disjoint intervals, sorted

  def add(self, start: float, end: float) -> None:
    """Merges [start, end] into the intervals."""
    first = bisect.bisect_left(self._ends, start)
    last = bisect.bisect_right(self._starts, end)
    if first < last:  # overlaps intervals first..last-1
      start = min(start, self._starts[first])
      end = max(end, self._ends[last - 1])
    self._starts[first:last] = [start]
    self._ends[first:last] = [end]

  @property
  def seconds(self) -> float:
    return float(sum(e - s for s, e in zip(self._starts, self._ends)))

  def __enter__(self) -> "CompileClock":
    with _lock:
      _open_clocks.append(self)
    return self

  def __exit__(self, *exc) -> None:
    with _lock:
      _open_clocks.remove(self)


def timed(fn) -> float:
  """Seconds for `fn()` to produce its (device) result, block_until_ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved_medians(fns: dict, repeats: int) -> tuple[dict, dict, float]:
  """Runs every `fns[name]()` once (compiling it), then times them all
  `repeats` times interleaved, so that each sees the same machine load.

  Returns:
    ({name: median seconds}, {name: [seconds of each repeat]}, seconds of
    the first, compiling, runs).
  """
  start = time.perf_counter()
  for fn in fns.values():
    jax.block_until_ready(fn())
  warmup = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  medians = {name: float(np.median(t)) for name, t in times.items()}
  return medians, times, warmup
