"""The training-time study (experiments.training_time) with the personalized
systems: their time split on the shared clock and the figures, on a tiny
federation."""

import json

import pytest

from experiments import training_time

ALGORITHMS = ("fedavg", "meta_fedavg", "persafl_me")
ROUNDS = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("training_time")
  results = training_time.study(
      output_dir,
      ["synthetic-lr"],
      ALGORITHMS,
      ROUNDS,
      num_clients=10,
      num_devices=1,
  )
  return output_dir, results


def test_every_algorithm_has_its_time_split_and_curve(study):
  output_dir, results = study
  on_disk = json.loads((output_dir / "training_time.json").read_text())
  assert on_disk == results
  assert list(on_disk["synthetic-lr"]) == list(ALGORITHMS)
  for algorithm, values in on_disk["synthetic-lr"].items():
    split = values["time_per_client_s"]
    parts = [split[p] for p in training_time.SPLIT]
    assert min(parts) >= 0 and split["computation_s"] > 0, algorithm
    assert sum(parts) == pytest.approx(split["total_s"])
    assert values["iterative"]
    assert len(values["accuracy_per_round"]) == ROUNDS
    assert values["makespan_s"] > 0
  for figure in ("fig4_time.png", "fig5_accuracy.png"):
    assert (output_dir / figure).stat().st_size > 10_000


def test_asynchronous_split_is_the_runs_event_totals(study):
  output_dir, results = study
  saved = json.loads(
      (output_dir / "synthetic-lr" / "persafl_me" / "results.json").read_text()
  )
  values = results["synthetic-lr"]["persafl_me"]
  assert saved["config"]["persafl"]["personalization"] == "me"
  assert values["time_per_client_s"] == saved["timing"]["mean_per_client"]
  assert values["makespan_s"] == saved["time_per_round_s"][-1]


def test_unknown_algorithms_and_bad_settings_are_refused_before_any_run(
    tmp_path,
):
  with pytest.raises(ValueError, match=r"unknown algorithms \['sgd'\]"):
    training_time.study(tmp_path, ["synthetic-lr"], ["fedavg", "sgd"], ROUNDS)
  with pytest.raises(ValueError, match="'synthetic-lr' has no paper rounds"):
    training_time.study(tmp_path, ["synthetic-lr"], ["fedavg"])
  # FedACnnL reads --gamma, FedAvg does not: refused before FedACnnL runs.
  with pytest.raises(ValueError, match="--gamma does not apply"):
    training_time.study(
        tmp_path,
        ["synthetic-lr"],
        ["fedacnnl", "fedavg"],
        ROUNDS,
        num_clients=10,
        gamma=1.0,
    )
  assert not list(tmp_path.iterdir())
