"""The personalized-FL comparison (experiments.personalized) end to end on a
tiny federation: the table holds every method, aggregates the seeds' own
results.json, never mixes in runs of other settings, and refuses unknown
names and settings before any run."""

import json

import numpy as np
import pytest

from experiments import personalized

# The cheapest to compile (pFedACnnL and PersA-FL compile for ~20 s each;
# their results.json are tested in their own files).
METHODS = ("fedavg", "meta_nu1")
SEEDS = 2
SETTINGS = dict(
    num_clients=10, data_seed=0, eval_every=1, model="lr", num_devices=1
)
# The iterative methods' runs: with PyTorch's smaller init, meta_nu1's best
# accuracy (round 1) is the same at seeds 0 and 1; Flax's tells them apart.
ITERATIVE = dict(SETTINGS, init="flax")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("personalized")
  tables = personalized.study(
      output_dir, ["synthetic"], METHODS, SEEDS, rounds=2, **ITERATIVE
  )
  return output_dir, tables


def saved_runs(output_dir, method):
  return [
      json.loads(
          (
              output_dir / "synthetic" / method / f"seed_{s}" / "results.json"
          ).read_text()
      )
      for s in range(SEEDS)
  ]


def test_every_method_is_in_the_table_json_and_figure(study):
  output_dir, tables = study
  on_disk = json.loads((output_dir / "personalized.json").read_text())
  assert list(on_disk) == ["synthetic"]
  assert list(on_disk["synthetic"]) == list(METHODS)
  table = (output_dir / "personalized.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
  assert len(rows) == len(METHODS)
  for row, method in zip(rows, METHODS):
    summary = tables["synthetic"][method]
    assert row.startswith(f"| {personalized.METHODS[method][0]} |")
    assert f"{summary['best_mean']:.2f} +- {summary['best_std']:.2f}" in row
  assert "synthetic-LR, 10 clients, 2 seed(s)" in table
  assert (output_dir / "synthetic.png").stat().st_size > 10_000


def test_seeds_are_aggregated_from_each_runs_results(study):
  output_dir, tables = study
  for method in METHODS:
    runs = saved_runs(output_dir, method)
    assert [r["seed"] for r in runs] == list(range(SEEDS))
    summary = tables["synthetic"][method]
    best = [100 * r["accuracy"] for r in runs]
    last = [100 * r["last_accuracy"] for r in runs]
    np.testing.assert_allclose(summary["best"], best)
    assert summary["best_mean"] == pytest.approx(np.mean(best))
    assert summary["best_std"] == pytest.approx(np.std(best))
    assert summary["last_mean"] == pytest.approx(np.mean(last))
    assert summary["last_std"] == pytest.approx(np.std(last))
    assert all(last_ <= best_ + 1e-9 for last_, best_ in zip(last, best))
    # Seeds differ (model init, batches, the clock's device profiles).
    assert len(set(best)) == SEEDS
    for curve in summary["curves"]:
      times = curve["time_s"]
      assert times[0] > 0 and np.all(np.diff(times) > 0)


def test_accuracies_are_plausible(study):
  _, tables = study
  table = tables["synthetic"]
  for summary in table.values():
    assert 10 < summary["best_mean"] <= 100  # 10 classes: above chance
  # Personalized models beat the global one on non-IID clients.
  assert table["meta_nu1"]["best_mean"] > table["fedavg"]["best_mean"]


def test_rerun_reads_back_and_other_settings_are_refused(study):
  output_dir, tables = study
  saved = output_dir / "synthetic" / "fedavg" / "seed_0" / "results.json"
  before = saved.read_bytes(), saved.stat().st_mtime_ns
  again = personalized.study(
      output_dir, ["synthetic"], ["fedavg"], SEEDS, rounds=2, **ITERATIVE
  )
  assert again["synthetic"]["fedavg"] == tables["synthetic"]["fedavg"]
  with pytest.raises(ValueError, match=r"fedavg\.rounds: 2 -> 3"):
    personalized.study(
        output_dir, ["synthetic"], ["fedavg"], SEEDS, rounds=3, **ITERATIVE
    )
  assert (saved.read_bytes(), saved.stat().st_mtime_ns) == before


def test_unknown_names_and_bad_settings_are_refused_before_any_run(tmp_path):
  with pytest.raises(
      ValueError, match=r"unknown methods \['sgd'\]: .*meta_nu1"
  ):
    personalized.study(tmp_path, ["synthetic"], ["fedavg", "sgd"], 1)
  with pytest.raises(
      ValueError, match=r"unknown datasets \['cifar'\]: .*cifar10"
  ):
    personalized.study(tmp_path, ["synthetic", "cifar"], ["fedavg"], 1)
  # FedAvg reads --batch_size, pFedACnnL does not: refused before FedAvg runs.
  with pytest.raises(ValueError, match="--batch_size does not apply"):
    personalized.study(
        tmp_path,
        ["synthetic"],
        ["fedavg", "pfedacnnl"],
        1,
        rounds=2,
        **SETTINGS,
        batch_size=5,
    )
  assert not list(tmp_path.iterdir())
