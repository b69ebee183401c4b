r"""Edits a finished analytic run: removes clients exactly, or adds new ones.

  python -m experiments.edit --from=runs/mnist_mlp --remove_clients=3,7 \
      --output_dir=runs/mnist_mlp_without_3_7

  python -m experiments.edit --from=runs/mnist_mlp_without_3_7 \
      --add_from=runs/mnist_mlp/split.npz --add_clients=3,7 \
      --output_dir=runs/mnist_mlp_again

  python -m experiments.edit --from=runs/mnist_mlp --remove_clients=3,7 \
      --retrain --output_dir=runs/mnist_mlp_retrained

The edited run's folder is a run folder (results.json with an "edit"
section: who left and joined, the groups re-solved, accuracy before and
after, the time; params, split.npz, server_state.npz), so it can be edited
again. Client ids there are positions in the edited run (the staying
clients in order, then the joining ones). `--retrain` trains the edited
federation from scratch with the same grouping instead: the reference that
the edit equals. The work is `afl.editing`'s; a bad flag or edit is refused
before anything is written (one line on standard error, exit status 2).
"""

from absl import flags

import afl
from experiments import common

flags.DEFINE_string("from", None, "The finished analytic run's folder.")
flags.DEFINE_list(
    "remove_clients", [], "Ids of the clients that leave (the run's ids)."
)
flags.DEFINE_string(
    "add_from",
    None,
    "A split file over the run's data (e.g. another run's split.npz) whose "
    "clients join.",
)
flags.DEFINE_list(
    "add_clients",
    [],
    "Ids (in --add_from) of the clients that join; empty: all of them.",
)
flags.DEFINE_bool(
    "retrain",
    False,
    "Train the edited federation from scratch (same grouping) instead.",
)
flags.DEFINE_string("output_dir", None, "Where the edited run goes.")
flags.DEFINE_bool("overwrite", False, "Replace a run in --output_dir.")
FLAGS = flags.FLAGS


def _ints(flag: str, values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} takes client ids, got {values}") from None


def main(argv):
  del argv
  if not FLAGS["from"].value:
    raise ValueError("--from=RUN_DIR is required")
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required")
  if FLAGS.add_clients and not FLAGS.add_from:
    raise ValueError("--add_clients needs --add_from=SPLIT_FILE")
  remove = _ints("remove_clients", FLAGS.remove_clients)
  add_ids = _ints("add_clients", FLAGS.add_clients) or None
  afl.results.check_output(FLAGS.output_dir, FLAGS.overwrite)
  source = afl.editing.load(FLAGS["from"].value)
  add = None
  if FLAGS.add_from:
    add = afl.editing.newcomers_from(source, FLAGS.add_from, add_ids)
  edited = afl.editing.edit(source, remove, add, retrain=FLAGS.retrain)
  afl.editing.write(edited, FLAGS.output_dir, FLAGS.overwrite)
  print(f"wrote {FLAGS.output_dir}/results.json")


if __name__ == "__main__":
  common.run(main)
