"""What the studies and benchmarks under experiments/ share.

`check_names` refuses a list flag's unknown entries (a study's columns,
algorithms, methods, settings) before any work, naming the allowed ones;
`training_seconds` is a run's training time as they report it.
"""

from typing import Iterable


def check_names(flag: str, names: Iterable[str], allowed) -> None:
  """Raises ValueError naming the entries of list flag `--flag` (`names`)
  that are not in `allowed`, and listing those that are."""
  unknown = [name for name in names if name not in allowed]
  if unknown:
    raise ValueError(
        f"unknown {flag} {unknown}: --{flag} takes {', '.join(allowed)}"
    )


def training_seconds(results: dict) -> float:
  """A run's training time without compilation: its rounds' wall time
  (`wall_time_s`) plus, for the analytic algorithms, the grouping stage
  (`grouping_time_s`: eq. 8, 9 and K-means, which the runtime does when it
  builds the algorithm and reports apart)."""
  return results["wall_time_s"] + results.get("grouping_time_s", 0.0)
