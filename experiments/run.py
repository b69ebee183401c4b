r"""Runs one federated experiment and writes DIR/results.json.

  python -m experiments.run --algorithm=fedacnnl --dataset=mnist --model=mlp \
      --num_clients=100 --dirichlet_beta=0.1 --gamma=100 --seed=0 \
      --data_dir=../shared/data --output_dir=runs/mnist_mlp

  python -m experiments.run --algorithm=pfedme --dataset=mnist --model=mlp \
      --rounds=100 --data_dir=../shared/data --output_dir=runs/pfedme

  python -m experiments.run --config=runs/pfedme/results.json \
      --rounds=200 --output_dir=runs/pfedme_longer

The flags are generated from the settings' declarations (`afl.config.COMMON`
and the registered algorithms', `afl.registry.fields`); an algorithm's
setting left unset takes the algorithm's registered default (the papers'
values). `--config` reads settings from a file (a .py with `get_config()`,
or JSON: a config or a results.json); flags given as well override it. The
work is done by `afl.runtime.prepare` and `execute`.

A bad flag or setting (or an output folder that holds a finished run) is
refused before anything is written: one line on standard error, exit status
2. A rerun into the folder of an interrupted run resumes from its last
checkpoint. The flags are parsed and the settings checked before JAX loads
(`afl` imports `afl.runtime` and the rest on first use), so `--help` and a
bad flag answer at once. A run whose loss diverged writes its results with
status "diverged" and exits with status 1; one whose numbers break (non-
finite or overflowing statistics, a failed Cholesky:
`afl.solve.NumericalError`) writes nothing and exits with status 1, naming
the layer and the clients.
"""

import sys

from absl import flags

import afl
from afl import config as config_lib
from afl import registry
import baselines  # pylint: disable=unused-import  (registers the baselines)
from experiments import common

_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def _define(name: str, field: registry.Field, default) -> None:
  if field.choices is not None:
    flags.DEFINE_enum(
        name, default, [str(c) for c in field.choices], field.help
    )
  else:
    _DEFINE[field.type](name, default, field.help)


def define_flags() -> None:
  """One flag per setting: the common ones with their defaults, the
  algorithms' unset (None: the algorithm's default)."""
  for name, field in config_lib.COMMON.items():
    if name == "algorithm":
      lines = [f"{n}: {registry.get(n).description}" for n in registry.names()]
      flags.DEFINE_enum(
          name, config_lib.DEFAULTS[name], registry.names(), "; ".join(lines)
      )
    else:
      _define(name, field, config_lib.DEFAULTS[name])
  for name, field in registry.fields().items():
    _define(name, field, None)
  flags.DEFINE_string(
      "config",
      None,
      "Settings from a file: a .py with get_config() or JSON (a config or a "
      "results.json); flags given as well override it.",
  )
  flags.DEFINE_string("output_dir", None, "Where results.json goes.")
  flags.DEFINE_bool(
      "dry_run",
      False,
      "Check the settings, print the config as JSON (a --config file) and "
      "stop.",
  )


def settings_from_flags() -> dict:
  """The settings the command line gives: the --config file's, then every
  flag given explicitly."""
  settings = config_lib.load_file(FLAGS.config) if FLAGS.config else {}
  for name in list(config_lib.COMMON) + list(registry.fields()):
    if FLAGS[name].present:
      settings[name] = FLAGS[name].value
  return settings


define_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = afl.get_config(**settings_from_flags())
  if FLAGS.dry_run:
    print(config.to_json(indent=2))
    return
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required")
  afl.distributed.initialize()  # several processes when launched so (launch/)
  run = afl.runtime.prepare(config, FLAGS.output_dir)
  # Past this point a ValueError is not the user's: a traceback.
  try:
    results = afl.runtime.execute(run)
  except afl.solve.NumericalError as error:  # nothing was written
    print(f"experiments.run: {error}", file=sys.stderr)
    sys.exit(1)
  except ValueError as error:
    raise RuntimeError(error) from error
  if results["status"] != "completed":
    print(
        f"experiments.run: the run {results['status']} at round "
        f"{results['diverged_round']}; its results (status "
        f"{results['status']!r}) are in {FLAGS.output_dir}",
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  common.run(main)
