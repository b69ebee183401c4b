"""What the entry points under experiments/ share.

`run` runs an absl main so that a bad flag or setting is one line on
standard error and exit status 2 (`fail`), not a traceback; `check_names`
refuses a list flag's unknown entries (a study's columns, algorithms,
methods, settings) before any work, naming the allowed ones;
`training_seconds` is a run's training time as they report it; `pyplot`
imports matplotlib when a figure is drawn, not when the module is (with
`afl`'s lazy submodules, `--help` and a bad flag answer before JAX or
matplotlib load).
"""

import sys
from typing import Iterable, NoReturn

from absl import app
from absl import flags


def _program() -> str:
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  return spec.name if spec else sys.argv[0]


def fail(message) -> NoReturn:
  """One line on standard error, exit status 2 (a usage error)."""
  print(f"{_program()}: error: {message}", file=sys.stderr)
  sys.exit(2)


_HELP = ("-?", "-h", "--help", "--helpshort", "--helpfull")


def _parse_flags(argv):
  """absl's flag parsing; --help answers with exit status 0 (absl's is 1),
  a bad flag by `fail`."""
  asked = [a for a in argv[1:] if a in _HELP]
  if asked:
    app.usage(
        shorthelp="--helpfull" not in asked, writeto_stdout=True, exitcode=0
    )
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(error)


def run(main) -> None:
  """app.run(main), a bad flag or a ValueError / FileExistsError out of
  main (a setting, the data, an output folder) reported by `fail`."""

  def checked(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {argv[1:]}")
    try:
      return main(argv)
    except (ValueError, FileExistsError) as error:
      fail(error)

  app.run(checked, flags_parser=_parse_flags)


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


def pyplot():
  """matplotlib.pyplot with the file-only Agg backend, imported now."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt
