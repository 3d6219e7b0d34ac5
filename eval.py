"""Evaluate the latest checkpoint in a workdir: `python eval.py --workdir=DIR [--config=...]`.

Without --config the run's own config (stored in the checkpoint) is used.
Tasks come from `config.eval_tasks` or `--tasks` (comma-separated): `text` is the
held-out split of the run's own data, whatever its modality (text, images, image-text
pairs), evaluated with the run's task; `mqar`, `passkey`, `selective_copy` are synthetic
recall probes for language models. Writes DIR/eval.json and prints it.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file; default: the checkpoint's.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated eval tasks; default config.eval_tasks.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import json
  from zoo.cli import one_line_errors
  from zoo.training.evaluation import evaluate_checkpoint
  with one_line_errors():
    results = evaluate_checkpoint(_WORKDIR.value, config=_CONFIG.value, tasks=_TASKS.value,
                                  step=_STEP.value)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  from zoo.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
