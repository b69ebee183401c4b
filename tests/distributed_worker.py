"""One process of the multi-process test (tests/test_distributed.py).

  python -m tests.distributed_worker OUTPUT_DIR

joins the distributed runtime from the environment set by `launch.local`
and runs `CONFIGS` through the ordinary experiment entry point, writing
OUTPUT_DIR/<algorithm>/ (process 0 only).
"""

import sys

from absl import logging

from afl import distributed
from afl import experiment

# Small and exact: float64 products, so 1 and 2 processes agree to rounding.
CONFIGS = {
    algorithm: dict(
        algorithm=algorithm,
        dataset="synthetic",
        model="mlp",
        num_clients=12,
        num_groups=3,
        statistics_dtype="float64",
        overwrite=True,
    )
    for algorithm in ("fedacnnl", "pfedacnnl")
}


def config(algorithm: str):
  cfg = experiment.default_config()
  cfg.update(CONFIGS[algorithm])
  return cfg


def main(output_dir: str) -> None:
  logging.set_verbosity(logging.INFO)
  distributed.initialize()
  for algorithm in CONFIGS:
    experiment.run_experiment(config(algorithm), f"{output_dir}/{algorithm}")


if __name__ == "__main__":
  main(sys.argv[1])
