"""Wall-clock accounting helpers.

`CompileClock` separates JAX's tracing and compilation from execution: JAX
reports the duration of every trace, lowering and backend compile through
`jax.monitoring`; the clock sums those that happen while it is open, so a
training loop can report `wall_time_s` (execution) and `compile_time_s`
without running twice.
"""

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
    with _lock:
      for clock in _open_clocks:
        clock.seconds += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileClock:
  """Context manager: `seconds` spent compiling while it is open."""

  def __init__(self):
    self.seconds = 0.0

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
