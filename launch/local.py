r"""Starts N processes of one distributed JAX program on this machine.

  python -m launch.local --num_processes=2 --devices_per_process=2 \
      --process_log_dir=runs/mp/logs -- \
      python -m experiments.run --algorithm=pfedacnnl --dataset=mnist \
      --data_dir=../shared/data --output_dir=runs/mp

Every process gets the same command and, in its environment, the
coordinator address (a free localhost port), the process count and its id
(`afl.distributed.initialize` reads them) and `XLA_FLAGS` with
`--xla_force_host_platform_device_count=--devices_per_process` (CPU devices
must be set before JAX is imported, hence one process per setting). Each
process's output goes to PROCESS_LOG_DIR/process_<i>.log. When a process
fails, the others are stopped (SIGTERM, then SIGKILL after --grace_s) and
the launcher exits with the failed process's status, naming it and printing
the end of its log; it exits 0 when all succeed.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from afl import distributed


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def child_environment(
    base: dict[str, str],
    coordinator: str,
    num_processes: int,
    process_id: int,
    devices_per_process: int,
) -> dict[str, str]:
  """`base` plus the distributed settings and the CPU device count."""
  xla_flags = re.sub(
      r"--xla_force_host_platform_device_count=\S+",
      "",
      base.get("XLA_FLAGS", ""),
  )
  return {
      **base,
      distributed.COORDINATOR: coordinator,
      distributed.NUM_PROCESSES: str(num_processes),
      distributed.PROCESS_ID: str(process_id),
      "XLA_FLAGS": (
          f"{xla_flags} --xla_force_host_platform_device_count="
          f"{devices_per_process}"
      ).strip(),
  }


def _stop(processes: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every running child's process group, SIGKILL if it stays."""
  running = [p for p in processes if p.poll() is None]
  for process in running:
    _signal_group(process, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for process in running:
    try:
      process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(process, signal.SIGKILL)
      process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(process.pid, sig)
  except ProcessLookupError:  # it has just exited
    pass


def _tail(path: pathlib.Path, lines: int = 20) -> str:
  return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_local(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    log_dir: str | os.PathLike,
    grace_s: float = 10.0,
    poll_s: float = 0.2,
) -> int:
  """Runs `command` as `num_processes` processes; returns the exit status.

  Args:
    command: the program and its arguments (the same for every process).
    num_processes: N.
    devices_per_process: CPU devices each process sees.
    log_dir: where process_<i>.log go (created).
    grace_s: how long a stopped child may take before SIGKILL.
    poll_s: how often the children are checked.

  Returns:
    0 if every process exited 0; otherwise the status of the first process
    seen failing (the others are stopped).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
        f"num_processes ({num_processes}) and devices_per_process "
        f"({devices_per_process}) must be >= 1"
    )
  if not command:
    raise ValueError("no command to run")
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  coordinator = f"localhost:{free_port()}"
  processes, logs = [], []
  try:
    for process_id in range(num_processes):
      log_path = log_dir / f"process_{process_id}.log"
      with open(log_path, "wb") as log:  # the child keeps its own handle
        processes.append(
            subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_environment(
                    dict(os.environ),
                    coordinator,
                    num_processes,
                    process_id,
                    devices_per_process,
                ),
                start_new_session=True,  # its own group: stop its children
            )
        )
      logs.append(log_path)
    logging.info(
        "started %d processes (coordinator %s), logs in %s",
        num_processes,
        coordinator,
        log_dir,
    )
    while True:
      statuses = [p.poll() for p in processes]
      failed = [i for i, s in enumerate(statuses) if s not in (None, 0)]
      if failed:
        first = failed[0]
        logging.error(
            "process %d exited with status %d; stopping the others. End of "
            "%s:\n%s",
            first,
            statuses[first],
            logs[first],
            _tail(logs[first]),
        )
        _stop(processes, grace_s)
        return statuses[first]
      if all(s == 0 for s in statuses):
        logging.info("all %d processes finished", num_processes)
        return 0
      time.sleep(poll_s)
  finally:
    _stop(processes, grace_s)  # also on KeyboardInterrupt or errors here


_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer(
    "devices_per_process", 1, "CPU devices per process (XLA_FLAGS)."
)
_LOG_DIR = flags.DEFINE_string(
    "process_log_dir", "launch_logs", "Where process_<i>.log go."
)
_GRACE = flags.DEFINE_float(
    "grace_s", 10.0, "Seconds a stopped process may take before SIGKILL."
)


def main(argv):
  command = argv[1:]
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    raise app.UsageError("give the command after --")
  logging.set_verbosity(logging.INFO)
  status = run_local(
      command,
      _NUM_PROCESSES.value,
      _DEVICES.value,
      _LOG_DIR.value,
      _GRACE.value,
  )
  sys.exit(status if status >= 0 else 128 - status)  # -N: killed by signal N


if __name__ == "__main__":
  app.run(main)
