"""The command lines of Table II and Fig. 6 (experiments.table2, .fig6):
names they cannot run are refused before any work, and a saved run of other
settings is refused with the settings that differ, never reused."""

import json
import pathlib
import subprocess
import sys

import afl

_REPO = pathlib.Path(__file__).resolve().parents[1]


def run(module: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", f"experiments.{module}", *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
      check=False,
  )


def test_table2_refuses_a_saved_run_of_other_clients(tmp_path):
  flags = (
      "--settings=synthetic-lr",
      "--columns=fedacnnl",
      "--seeds=1",
      f"--output_dir={tmp_path}",
  )
  first = run("table2", *flags, "--num_clients=10")
  assert first.returncode == 0, first.stderr
  saved = tmp_path / "synthetic-lr" / "fedacnnl" / "seed_0" / "results.json"
  results, table = saved.read_bytes(), (tmp_path / "table2.json").read_bytes()
  assert json.loads(results)["num_clients"] == 10
  second = run("table2", *flags, "--num_clients=20")
  assert second.returncode != 0
  assert "num_clients: 10 -> 20" in second.stderr, second.stderr
  assert saved.read_bytes() == results
  assert (tmp_path / "table2.json").read_bytes() == table


def test_table2_refuses_an_unknown_column_before_any_run(tmp_path):
  out = tmp_path / "table"
  done = run(
      "table2",
      "--settings=synthetic-lr",
      "--columns=fedacnnl,fedavg",  # FedAvg is not a column of Table II
      "--seeds=1",
      "--num_clients=10",
      f"--output_dir={out}",
  )
  assert done.returncode != 0
  assert "unknown columns ['fedavg']" in done.stderr, done.stderr
  assert "pfedacnnl_wc" in done.stderr  # the allowed columns are listed
  assert not out.exists()


FIG6_FLAGS = ("--num_clients=10", "--min_client_size=5", "--seed=0")


def test_fig6_refuses_an_unknown_algorithm_before_any_run(tmp_path):
  out = tmp_path / "figure"
  done = run(
      "fig6",
      "--algorithms=fedacnnl,fedac",
      "--width=0.0625",
      *FIG6_FLAGS,
      f"--output_dir={out}",
  )
  assert done.returncode != 0
  assert "unknown algorithms ['fedac']" in done.stderr, done.stderr
  assert "pfedacnnl_wp" in done.stderr
  assert not out.exists()


def test_fig6_refuses_a_saved_run_of_another_width(tmp_path, data_dir):
  # A saved FedACnnL run of width 1/32 (its config alone: running the DCNN
  # would take minutes here); the figure at width 1/16 must not reuse it.
  saved = tmp_path / "fedacnnl" / "results.json"
  saved.parent.mkdir()
  config = afl.get_config(
      algorithm="fedacnnl",
      dataset="cifar10",
      model="dcnn",
      width=0.03125,
      num_clients=10,
      min_client_size=5,
      data_dir=str(data_dir),
  )
  saved.write_text(json.dumps({"config": config.to_dict()}))
  before = saved.read_bytes()
  done = run(
      "fig6",
      "--algorithms=fedacnnl",
      "--width=0.0625",
      *FIG6_FLAGS,
      f"--data_dir={data_dir}",
      f"--output_dir={tmp_path}",
  )
  assert done.returncode != 0
  # The one setting that differs, named with both values.
  assert "(width: 0.03125 -> 0.0625)" in done.stderr, done.stderr
  assert saved.read_bytes() == before
  assert not (tmp_path / "fig6.json").exists()


STUDIES = (
    "run",
    "table2",
    "fig6",
    "training_time",
    "participation",
    "personalized",
    "privacy",
    "edit",
)
BENCHMARKS = (
    "benchmark_baselines",
    "benchmark_editing",
    "benchmark_fedacnnl",
    "benchmark_meta",
    "benchmark_scaling",
    "benchmark_secure_sum",
    "benchmark_threading",
    "timing_benchmark",
)
_HELP_IMPORTS = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
  runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as done:
  assert done.code == 0, done.code
print(sorted(m for m in ("jax", "matplotlib", "flax") if m in sys.modules))
"""


def test_help_answers_before_jax_or_matplotlib_load():
  """--help (and so a bad flag, parsed at the same point) needs neither JAX
  nor matplotlib: the entry points (studies and benchmarks) reach them
  through `afl`'s lazy submodules, a local `import jax` and `common.pyplot`
  when they work."""
  for study in STUDIES + BENCHMARKS:
    done = subprocess.run(
        [sys.executable, "-c", _HELP_IMPORTS, f"experiments.{study}"],
        cwd=_REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", (study, done.stdout[-200:])
