r"""Simulated training time on heterogeneous clients: one clock for every
algorithm (section III-C, eq. 7, Algorithm 1; section V, Fig. 4).

A vectorized simulation computes all clients at once, so what each client
*would* spend is modelled, from measured ingredients:

* `DeviceProfiles`: per client a number of CPU cores (uniform in 1..4, the
  paper's testbed), an uplink/downlink bandwidth and a latency, drawn from one
  key by `draw_profiles`.
* `HostCalibration` (`calibrate`): this host's single-core throughput, in
  FLOP/s, of a matrix-product step as a function of the batch size, and the
  fixed per-batch overhead of running a jitted step; measured in a
  subprocess pinned to one core, cached in-process and on disk
  (~/.cache/afl/calibration-*.json) and logged.
* `step_flops`: the FLOPs of a client's jitted local step, from XLA's cost
  analysis (`jax.jit(f).lower(...).cost_analysis()`) at two batch sizes;
  FLOPs are affine in the batch size, so two points give every batch size.
* `CostModel`: seconds of a batch of b samples on c cores =
  overhead + flops(b) / (throughput(b) * c), and of a round the sum over its
  ceil(n / B) batches (the last one partial). Assumption: the FLOP part
  scales linearly with cores (c cores run c times the measured single-core
  throughput), the per-batch overhead does not scale. The time is
  increasing in the work and decreasing in the cores; the measured
  throughput table is made non-decreasing in the batch size (a running
  maximum over the noisy measurements), so a larger batch never costs more
  per sample.
* Communication: latency + 8 bytes / bandwidth, with the bytes of the
  arrays actually sent (FedACnnL: the client's statistics up, the layer's
  weights and the next batch size down; gradient baselines: whole models).

Per round (`simulate_round`), on the server's clock, round l of client i
starts when it has received the previous round's download (all clients at 0
in round 1):

  arrival_i   = start_i + computation_i + upload_i
  idle_i      = max_j arrival_j - arrival_i + server_s    (waiting for the
                slowest client, and for the server's own work, if given)
  server idle = max_j arrival_j - min_j arrival_j          (holding some
                statistics while waiting for the last one; the time before
                the first arrival is not counted)
  start_i of the next round = max_j arrival_j + server_s + download_i

communication_i = upload_i + download_i; a client's total is computation +
communication + idle. The server's own aggregation and solve are not
modelled (`server_s` = 0 unless a caller passes a time).

With partial participation (`afl.participation`), the round above is that
of the sampled clients; the server opens it at O (the previous close +
server_s) and closes it at

  close = min(max over sampled i of event_i, O + deadline_s)

where event_i is client i's arrival, or, for a client that drops out, the
end of its computation (it fails there: its work is counted, its upload
never sent). A client not dropped whose arrival is past O + deadline_s is
late: its upload is dropped for the round, it idles 0 and starts the next
round once it is done (max(close + server_s, arrival_i) + download_i).
Only the clients that reported wait (idle_i = close - arrival_i +
server_s); the server idles from the first report to the close, the
deadline included. A client that sits the round out computes and sends
nothing, but downloads the round's result like every client (the analytic
layers are needed by all). Eq. 7 adapts only the batch sizes of the
clients that reported, the minimum taken over them; the others keep theirs
(`adaptive_batch_size`).

Eq. 7's T_l^(i) (`adaptive_batch_size`) is the arrival time on the client's
own busy clock: T_l^(i) = sum over rounds r <= l of computation and upload,
plus the downloads of rounds r < l, so T_l^(i) - T_{l-1}^(i) is exactly the
client's time consumption in round l (the quantity the paper says the
interval approximates). On the shared server clock the interval would also
hold the wait for the previous round's straggler, which makes every
client's interval about equal to the straggler's.

Interface for any algorithm: the run loop (`afl.runtime`) builds a
`Clock(profiles, cost_model, initial_batch_size, max_batch_size, adaptive)`
and, every round, passes it what each client did, the algorithm's
`work(round, clock.batch_size)` (`afl.algorithm`), a `ClientWork`:

  work = ClientWork(num_samples=[C] samples processed this round,
                    batch_size=clock.batch_size (or a fixed [C] array),
                    flops_fixed=..., flops_per_sample=... (`step_flops`),
                    bytes_up=[C], bytes_down=[C])
  record, who = clock.round(work, who)  # logs a line; who: the round's
                                        # participation, late ones marked
  clock.summary()               # results.json's "timing" section

For H local steps of batch B (a gradient baseline), num_samples = H * B.
"""

import functools
import hashlib
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from afl import memory
from afl import models
from afl import participation as participation_lib
from afl import statistics

DEFAULT_BATCH_GRID = tuple(2**k for k in range(13))  # 1 .. 4096
_CALIBRATION_WIDTH = 256  # columns of the calibration Gram step
_REPO = pathlib.Path(__file__).resolve().parents[1]


class DeviceProfiles(NamedTuple):
  """Per-client hardware and network.

  Attributes:
    cores: [C] int, CPU cores.
    bandwidth_bps: [C] float, bits per second (both directions).
    latency_s: [C] float, one-way latency per message.
  """

  cores: np.ndarray
  bandwidth_bps: np.ndarray
  latency_s: np.ndarray


def draw_profiles(
    key: jax.Array,
    num_clients: int,
    cores: tuple[int, int] = (1, 4),
    bandwidth_gbps: tuple[float, float] = (100.0, 100.0),
    latency_ms: tuple[float, float] = (0.002, 0.002),
) -> DeviceProfiles:
  """Draws client profiles: cores uniform on the integers of `cores`
  (inclusive), bandwidth log-uniform and latency uniform in their ranges.

  Defaults: the paper's testbed (1..4 cores, 100 Gbps InfiniBand); the
  paper gives no latency, 2 microseconds is typical of InfiniBand.
  """
  for name, (low, high) in (
      ("cores", cores),
      ("bandwidth_gbps", bandwidth_gbps),
      ("latency_ms", latency_ms),
  ):
    if not 0 <= low <= high or (name != "latency_ms" and low <= 0):
      raise ValueError(f"{name} range must be 0 < low <= high, got {low, high}")
  k_cores, k_bandwidth, k_latency = jax.random.split(key, 3)
  drawn_cores = jax.random.randint(
      k_cores, (num_clients,), cores[0], cores[1] + 1
  )
  log_bandwidth = jax.random.uniform(
      k_bandwidth,
      (num_clients,),
      minval=math.log(bandwidth_gbps[0]),
      maxval=math.log(bandwidth_gbps[1]),
  )
  latency = jax.random.uniform(
      k_latency, (num_clients,), minval=latency_ms[0], maxval=latency_ms[1]
  )
  return DeviceProfiles(
      np.asarray(drawn_cores, np.int64),
      np.exp(np.asarray(log_bandwidth, np.float64)) * 1e9,
      np.asarray(latency, np.float64) * 1e-3,
  )


class HostCalibration(NamedTuple):
  """Measured single-core speed of this host (see `calibrate`).

  Attributes:
    batch_sizes: [G] the measured batch sizes, increasing.
    flops_per_s: [G] throughput at each, non-decreasing.
    overhead_s: fixed seconds per batch (running one tiny jitted step).
    host: the CPU and jax version it was measured with.
  """

  batch_sizes: tuple[int, ...]
  flops_per_s: tuple[float, ...]
  overhead_s: float
  host: str


def _host() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}; jax {jax.__version__}"


def _median_seconds(fn, *args, min_total_s: float = 0.02) -> float:
  """Median over 5 samples of fn(*args)'s time, each sample long enough."""
  jax.block_until_ready(fn(*args))
  reps, samples = 1, []
  while True:
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    if elapsed >= min_total_s / 5 or reps >= 2**16:
      break
    reps *= 4
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / reps)
  return float(np.median(samples))


def measure(batch_sizes: Sequence[int] = DEFAULT_BATCH_GRID) -> dict:
  """Measures in *this* process (`calibrate` runs it pinned to one core).

  The step is a Gram update g + x^T x with x [b, 256] float32, the kind of
  product FedACnnL's clients and dense layers spend their time in; the
  overhead is the time of the same jitted step on a [1, 1] input.
  """
  step = jax.jit(lambda g, x: g + x.T @ x)
  tiny = jnp.zeros((1, 1), jnp.float32)
  overhead = _median_seconds(step, tiny, tiny)
  width = _CALIBRATION_WIDTH
  gram = jnp.zeros((width, width), jnp.float32)
  throughput = []
  for b in batch_sizes:
    x = jax.random.normal(jax.random.key(b), (b, width), jnp.float32)
    flops = step.lower(gram, x).cost_analysis()["flops"]
    seconds = _median_seconds(step, gram, x)
    throughput.append(flops / max(seconds - overhead, 1e-3 * seconds))
  return {
      "batch_sizes": [int(b) for b in batch_sizes],
      "flops_per_s": np.maximum.accumulate(throughput).tolist(),
      "overhead_s": overhead,
      "host": _host(),
  }


def _measure_pinned(batch_sizes: Sequence[int]) -> dict:
  """Runs `measure` in a fresh process restricted to one CPU core."""
  code = (
      "import json, os, sys\n"
      "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
      "from afl import clock\n"
      f"print(json.dumps(clock.measure({list(batch_sizes)!r})))\n"
  )
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_REPO)] + [p for p in [env.get("PYTHONPATH")] if p]
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _disk_cached(name: str, key, compute: Callable[[], dict], cache_dir):
  """(compute() or its stored result, where it came from); stored as JSON
  under cache_dir, named by a digest of `key` (None: not stored)."""
  if cache_dir is None:
    return compute(), "measured"
  tag = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
  path = pathlib.Path(cache_dir).expanduser() / f"{name}-{tag}.json"
  if path.exists():
    return json.loads(path.read_text()), f"cached in {path}"
  value = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(value))
  os.replace(tmp, path)
  return value, f"measured, stored in {path}"


@functools.lru_cache(maxsize=None)
def calibrate(
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_GRID,
    cache_dir: str | None = "~/.cache/afl",
) -> HostCalibration:
  """This host's single-core throughput per batch size and per-batch overhead.

  Measured once per host (CPU model and jax version) and batch grid, then
  read from `cache_dir` (None: never stored); cached in-process too. Logs
  the table.
  """
  if not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f"batch_sizes must be >= 1, got {batch_sizes}")
  batch_sizes = tuple(sorted(set(batch_sizes)))
  measured, source = _disk_cached(
      "calibration",
      (_host(), batch_sizes),
      lambda: _measure_pinned(batch_sizes),
      cache_dir,
  )
  calibration = HostCalibration(
      tuple(measured["batch_sizes"]),
      tuple(measured["flops_per_s"]),
      float(measured["overhead_s"]),
      measured["host"],
  )
  logging.info(
      "host calibration (%s; %s): per-batch overhead %.1f us; "
      "single-core GFLOP/s by batch size: %s",
      source,
      calibration.host,
      calibration.overhead_s * 1e6,
      ", ".join(
          f"{b}: {f / 1e9:.2f}"
          for b, f in zip(calibration.batch_sizes, calibration.flops_per_s)
      ),
  )
  return calibration


class StepFlops(NamedTuple):
  """FLOPs of one batch of b samples: fixed + per_sample * b."""

  fixed: float
  per_sample: float


def step_flops(fn: Callable, example_args: Callable[[int], tuple]) -> StepFlops:
  """FLOPs of a client's local step from XLA's cost analysis.

  Args:
    fn: the step (it is jitted and lowered, not run).
    example_args: batch size -> the step's arguments (arrays or
      jax.ShapeDtypeStruct) for a batch of that size.

  Returns:
    StepFlops fitted through batch sizes 8 and 16 (FLOPs are affine in the
    batch size).
  """
  jitted = jax.jit(fn)
  small, large = (
      float(jitted.lower(*example_args(b)).cost_analysis()["flops"])
      for b in (8, 16)
  )
  per_sample = (large - small) / 8
  return StepFlops(max(small - 8 * per_sample, 0.0), per_sample)


class ClientWork(NamedTuple):
  """What every client does in one round.

  Attributes:
    num_samples: [C] samples processed (one epoch: |D_i|; H steps: H * B).
    batch_size: [C] local batch size B_l^(i) (>= 1).
    flops_fixed: FLOPs per batch independent of its size (scalar or [C]).
    flops_per_sample: FLOPs per sample of a batch (scalar or [C]).
    bytes_up: [C] bytes uploaded to the server.
    bytes_down: [C] bytes downloaded from the server.
  """

  num_samples: np.ndarray
  batch_size: np.ndarray
  flops_fixed: float | np.ndarray
  flops_per_sample: float | np.ndarray
  bytes_up: np.ndarray
  bytes_down: np.ndarray


class CostModel(NamedTuple):
  """Seconds of computation and communication (module docstring)."""

  calibration: HostCalibration

  def batch_seconds(self, flops, batch_size, cores) -> np.ndarray:
    """overhead + flops / (throughput(batch_size) * cores), elementwise."""
    grid = np.log2(np.asarray(self.calibration.batch_sizes, np.float64))
    throughput = np.interp(
        np.log2(np.maximum(np.asarray(batch_size, np.float64), 1.0)),
        grid,
        np.asarray(self.calibration.flops_per_s, np.float64),
    )
    return self.calibration.overhead_s + np.asarray(flops, np.float64) / (
        throughput * np.asarray(cores, np.float64)
    )

  def computation_seconds(
      self, work: ClientWork, cores: np.ndarray
  ) -> np.ndarray:
    """[C] seconds of ceil(n / B) batches, the last one partial."""
    n = np.asarray(work.num_samples, np.int64)
    b = np.asarray(work.batch_size, np.int64)
    if np.any(b < 1):
      raise ValueError("batch sizes must be >= 1")
    full, rest = n // b, n % b

    def seconds(size):
      flops = work.flops_fixed + work.flops_per_sample * size
      return self.batch_seconds(flops, size, cores)

    return full * seconds(b) + np.where(rest > 0, seconds(rest), 0.0)


def transfer_seconds(
    num_bytes: np.ndarray, profiles: DeviceProfiles
) -> np.ndarray:
  """[C] latency + 8 bytes / bandwidth (0 when nothing is sent)."""
  num_bytes = np.asarray(num_bytes, np.float64)
  return np.where(
      num_bytes > 0,
      profiles.latency_s + 8 * num_bytes / profiles.bandwidth_bps,
      0.0,
  )


def adaptive_batch_size(
    arrival: np.ndarray,
    previous_arrival: np.ndarray,
    batch_size: np.ndarray,
    max_batch_size: np.ndarray,
    reported: np.ndarray | None = None,
) -> np.ndarray:
  """eq. 7: B_{l+1} = min(ceil((T_l - T_{l-1}) / min_j(T_l - T_{l-1}) B_l),
  B_max), over the clients that reported in round l.

  A client that did not report (not sampled, dropped, or past the
  deadline) gave the server no T_l: it keeps B_l, and the minimum is over
  the clients that reported (all keep theirs if none did).

  Args:
    arrival: [C] T_l^(i).
    previous_arrival: [C] T_{l-1}^(i) (T_0 = 0).
    batch_size: [C] B_l^(i).
    max_batch_size: [C] B_max^(i) = |D_i|.
    reported: [C] bool, None: every client.

  Returns:
    [C] int64 B_{l+1}^(i).
  """
  batch_size = np.asarray(batch_size, np.int64)
  if reported is None:
    reported = np.ones(len(batch_size), bool)
  if not reported.any():
    return batch_size
  interval = np.asarray(arrival, np.float64) - np.asarray(
      previous_arrival, np.float64
  )
  if np.any(interval[reported] <= 0):
    raise ValueError("arrival times must increase from round to round")
  scaled = np.ceil(interval / interval[reported].min() * batch_size)
  adapted = np.minimum(scaled, max_batch_size).astype(np.int64)
  return np.where(reported, adapted, batch_size)


class ClockState(NamedTuple):
  """Where every client is between rounds.

  Attributes:
    start_s: [C] server-clock time at which the client starts the round.
    busy_s: [C] its busy clock then (time spent computing or communicating).
    arrival_busy_s: [C] T_{l-1}^(i): the previous arrival on the busy clock.
    opened_s: server-clock time at which the server opened the round (the
      deadline counts from it).
  """

  start_s: np.ndarray
  busy_s: np.ndarray
  arrival_busy_s: np.ndarray
  opened_s: np.ndarray  # [] float64


def initial_state(num_clients: int) -> ClockState:
  zeros = np.zeros(num_clients)
  return ClockState(zeros, zeros, zeros, np.zeros(()))


class RoundTiming(NamedTuple):
  """One round of every client ([C] arrays, seconds) and the server."""

  batch_size: np.ndarray
  computation_s: np.ndarray
  upload_s: np.ndarray
  download_s: np.ndarray
  arrival_s: np.ndarray  # server clock
  arrival_busy_s: np.ndarray  # T_l^(i) of eq. 7
  idle_s: np.ndarray
  server_idle_s: float
  sampled: np.ndarray  # [C] bool
  dropped: np.ndarray  # [C] bool
  late: np.ndarray  # [C] bool


def simulate_round(
    state: ClockState,
    profiles: DeviceProfiles,
    cost_model: CostModel,
    work: ClientWork,
    server_s: float = 0.0,
    who: participation_lib.Participation | None = None,
    deadline_s: float = 0.0,
) -> tuple[ClockState, RoundTiming]:
  """One synchronous round (the timeline of the module docstring) of the
  clients `who` samples (all if None), the late ones decided here."""
  num_clients = len(profiles.cores)
  who = who or participation_lib.everyone(num_clients)
  sampled, dropped = who.sampled, who.dropped
  sending = sampled & ~dropped
  computation = np.where(
      sampled, cost_model.computation_seconds(work, profiles.cores), 0.0
  )
  upload = np.where(sending, transfer_seconds(work.bytes_up, profiles), 0.0)
  download = transfer_seconds(work.bytes_down, profiles)
  finished = state.start_s + computation  # a dropped client fails here
  arrival = finished + upload
  events = np.where(dropped, finished, arrival)[sampled]
  close = events.max() if len(events) else float(state.opened_s)
  late = np.zeros(num_clients, bool)
  if deadline_s:
    cutoff = float(state.opened_s) + deadline_s
    late = sending & (arrival > cutoff)
    close = min(close, cutoff)
  reported = sending & ~late
  arrival_busy = state.busy_s + computation + upload
  first = arrival[reported].min() if reported.any() else close
  timing = RoundTiming(
      np.asarray(work.batch_size, np.int64),
      computation,
      upload,
      download,
      np.where(sampled, arrival, np.nan),
      arrival_busy,
      np.where(reported, close - arrival + server_s, 0.0),
      float(close - first),
      sampled,
      dropped,
      late,
  )
  busy_until = np.where(sampled, np.where(dropped, finished, arrival), 0.0)
  return (
      ClockState(
          np.maximum(close + server_s, busy_until) + download,
          arrival_busy + download,
          arrival_busy,
          np.asarray(close + server_s),
      ),
      timing,
  )


class Clock:
  """Runs `simulate_round` round after round and keeps the records.

  With `adaptive`, the batch size of the next round is eq. 7's; otherwise it
  stays at the initial one (FedACnnL-WA, or a baseline's fixed batch).
  With `deadline_s` > 0 the server closes every round that long after
  opening it; uploads that would arrive later are dropped for the round
  (`afl.participation`).
  """

  def __init__(
      self,
      profiles: DeviceProfiles,
      cost_model: CostModel,
      initial_batch_size: int,
      max_batch_size: np.ndarray,
      adaptive: bool = True,
      deadline_s: float = 0.0,
  ):
    if initial_batch_size < 1:
      raise ValueError(
          f"initial_batch_size must be >= 1, got {initial_batch_size}"
      )
    if deadline_s < 0:
      raise ValueError(f"deadline_s must be >= 0, got {deadline_s}")
    self.profiles = profiles
    self.cost_model = cost_model
    self.adaptive = adaptive
    self.deadline_s = deadline_s
    self.max_batch_size = np.maximum(np.asarray(max_batch_size, np.int64), 1)
    self.batch_size = np.minimum(initial_batch_size, self.max_batch_size)
    self.state = initial_state(len(profiles.cores))
    self.rounds: list[RoundTiming] = []

  def round(
      self,
      work: ClientWork,
      who: participation_lib.Participation | None = None,
      server_s: float = 0.0,
  ) -> tuple[dict, participation_lib.Participation]:
    """Accounts one round of the clients `who` samples (all if None).

    Returns:
      (the round's summary numbers, also logged; `who` with the clients
      that missed the deadline marked late).
    """
    previous = self.state.arrival_busy_s
    self.state, timing = simulate_round(
        self.state,
        self.profiles,
        self.cost_model,
        work,
        server_s,
        who,
        self.deadline_s,
    )
    self.rounds.append(timing)
    who = participation_lib.Participation(
        timing.sampled, timing.dropped, timing.late
    )
    if self.adaptive:
      self.batch_size = adaptive_batch_size(
          timing.arrival_busy_s,
          previous,
          timing.batch_size,
          self.max_batch_size,
          who.reported,
      )
    sampled = timing.sampled
    record = {
        "batch_size_mean": float(timing.batch_size.mean()),
        "computation_s_mean": float(timing.computation_s[sampled].mean()),
        "communication_s_mean": float(
            (timing.upload_s + timing.download_s).mean()
        ),
        "idle_s_mean": float(timing.idle_s[sampled].mean()),
        "server_idle_s": timing.server_idle_s,
        "last_arrival_s": float(np.nanmax(timing.arrival_s)),
    }
    logging.info(
        "round %d timing: batch mean %.1f (%d..%d); computation mean %.4fs "
        "max %.4fs; communication mean %.6fs; client idle mean %.4fs; "
        "server idle %.4fs; last arrival %.4fs; %d sampled, %d dropped, "
        "%d late",
        len(self.rounds),
        record["batch_size_mean"],
        timing.batch_size.min(),
        timing.batch_size.max(),
        record["computation_s_mean"],
        timing.computation_s.max(),
        record["communication_s_mean"],
        record["idle_s_mean"],
        timing.server_idle_s,
        record["last_arrival_s"],
        sampled.sum(),
        timing.dropped.sum(),
        timing.late.sum(),
    )
    return record, who

  def state_dict(self) -> dict:
    """Where the clock stands, as JSON (a checkpoint's; `load_state`)."""
    return {
        "state": {k: v.tolist() for k, v in self.state._asdict().items()},
        "batch_size": self.batch_size.tolist(),
        "rounds": [
            {k: np.asarray(v).tolist() for k, v in r._asdict().items()}
            for r in self.rounds
        ],
    }

  def load_state(self, saved: dict) -> None:
    """Sets the clock to a `state_dict` (float64 round-trips JSON exactly)."""
    self.state = ClockState(
        *(np.asarray(saved["state"][k], np.float64) for k in ClockState._fields)
    )
    self.batch_size = np.asarray(saved["batch_size"], np.int64)
    dtypes = dict.fromkeys(RoundTiming._fields, np.float64)
    dtypes.update(batch_size=np.int64, sampled=bool, dropped=bool, late=bool)
    self.rounds = [
        RoundTiming(
            **{
                k: float(r[k])
                if k == "server_idle_s"
                else np.asarray(r[k], dtypes[k])
                for k in RoundTiming._fields
            }
        )
        for r in saved["rounds"]
    ]

  def summary(self) -> dict:
    """results.json's `timing` section (see the module docstring)."""
    per_client = {
        "computation_s": sum(r.computation_s for r in self.rounds),
        "communication_s": sum(r.upload_s + r.download_s for r in self.rounds),
        "idle_s": sum(r.idle_s for r in self.rounds),
    }
    per_client["total_s"] = sum(per_client.values())
    return {
        "adaptive_batch_size": self.adaptive,
        "deadline_s": self.deadline_s,
        "mean_per_client": {k: float(v.mean()) for k, v in per_client.items()},
        "sum_over_clients": {k: float(v.sum()) for k, v in per_client.items()},
        "server_idle_s": float(sum(r.server_idle_s for r in self.rounds)),
        "makespan_s": float(self.state.start_s.max()),
        "per_client": {k: v.tolist() for k, v in per_client.items()},
        "cores": self.profiles.cores.tolist(),
        "bandwidth_bps": self.profiles.bandwidth_bps.tolist(),
        "latency_s": self.profiles.latency_s.tolist(),
        "calibration": self.cost_model.calibration._asdict(),
        "rounds": [_round_summary(r) for r in self.rounds],
    }


def _round_summary(timing: RoundTiming) -> dict:
  """A round of the timing section: per-client numbers (None for a client
  not sampled) and who was sampled, dropped and late (client ids; only if
  not every client reported)."""
  out = {
      "batch_size": timing.batch_size.tolist(),
      "arrival_s": [
          None if np.isnan(a) else float(a) for a in timing.arrival_s
      ],
      "computation_s": timing.computation_s.tolist(),
      "idle_s": timing.idle_s.tolist(),
      "server_idle_s": timing.server_idle_s,
  }
  if (timing.dropped | timing.late | ~timing.sampled).any():
    for name in ("sampled", "dropped", "late"):
      out[name] = np.flatnonzero(getattr(timing, name)).tolist()
  return out


@functools.lru_cache(maxsize=None)
def statistics_step_flops(
    model,
    layer: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    dtype,
    cache_dir: str | None = "~/.cache/afl",
) -> StepFlops:
  """FLOPs of FedACnnL's local step for layer `layer`: one batch through
  layers 1..l-1 and its eq. 6 products (`statistics.block_statistics`).
  Cached in-process and in `cache_dir` (lowering costs about 50 ms)."""
  flops, _ = _disk_cached(
      "flops",
      (repr(model), layer, input_shape, num_classes, str(dtype), _host()),
      lambda: _statistics_step_flops(
          model, layer, input_shape, num_classes, dtype
      )._asdict(),
      cache_dir,
  )
  return StepFlops(**flops)


def _statistics_step_flops(
    model, layer, input_shape, num_classes, dtype
) -> StepFlops:

  params = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), input_shape)
  )
  return step_flops(
      functools.partial(
          statistics.block_statistics,
          model,
          layer,
          num_classes=num_classes,
          dtype=dtype,
      ),
      lambda b: (
          params,
          jax.ShapeDtypeStruct((b, *input_shape), np.float32),
          jax.ShapeDtypeStruct((b,), np.int32),
          jax.ShapeDtypeStruct((b,), np.bool_),
      ),
  )


BATCH_SIZE_BYTES = 4  # the next round's batch size, sent as an int32


def analytic_work(
    model,
    input_shape: tuple[int, ...],
    num_classes: int,
    statistics_dtype,
    client_sizes: np.ndarray,
) -> Callable[[int, np.ndarray], ClientWork]:
  """(layer, batch sizes [C]) -> what every client does in FedACnnL's round
  of that layer. Every client processes its |D_i| samples in batches of the
  given sizes, uploads its statistics (the [d - 1, d - 1] Gram, the
  [d - 1, d_y] label sums and the [d_y] label counts, float64 as this
  implementation sums them) and downloads the layer's weights (the full
  W_l, as the paper's server sends it) and its next batch size. (The paper
  uploads H = X^T Z, d x d_l; uploading X^T Y instead carries the same
  information in fewer bytes when d_y <= d_l.) The clients' computation is
  costed as the paper's: the forward pass through the full W_l, not the
  factored pass this implementation runs (`fedacnnl`)."""
  sizes = np.asarray(client_sizes, np.int64)
  ones = np.ones_like(sizes)
  params = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), input_shape)
  )
  sample = (
      jax.ShapeDtypeStruct((1, *input_shape), np.float32),
      jax.ShapeDtypeStruct((1,), np.int32),
      jax.ShapeDtypeStruct((1,), np.bool_),
  )

  def work(layer: int, batch_size: np.ndarray) -> ClientWork:
    flops = statistics_step_flops(
        model, layer, tuple(input_shape), num_classes, statistics_dtype
    )
    uploaded = jax.eval_shape(
        functools.partial(
            statistics.block_statistics,
            model,
            layer,
            num_classes=num_classes,
            dtype=jnp.float64,
        ),
        params,
        *sample,
    )
    layer_params = params["params"][models.layer_name(layer)]
    return ClientWork(
        sizes,
        batch_size,
        flops.fixed,
        flops.per_sample,
        ones * memory.tree_bytes(uploaded),
        ones * (memory.tree_bytes(layer_params) + BATCH_SIZE_BYTES),
    )

  return work
