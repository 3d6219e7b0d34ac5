"""Train any model of the zoo: `python train.py --config=configs/NAME.py --workdir=DIR`.

Every config field is a flag (`--config.total_steps=100`, `--config.model.attention=mha`,
`--config.mesh.tensor=2`). Rerunning with the same workdir resumes from its
latest checkpoint. Add `--distributed` on multi-host TPU/GPU slices.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from zoo.cli import one_line_errors
  from zoo.training.loop import train
  with one_line_errors():
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from zoo.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
