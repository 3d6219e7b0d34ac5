"""Continue a text prompt with a trained language model:

    python generate.py --workdir=DIR --prompt="def main(" [--max_new_tokens=64]
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--config=...]

Restores the latest checkpoint of DIR (or --step), tokenises the prompt with the
run's tokenizer, generates with a KV cache (zoo/generation) and prints the
continuation. Without --config the run's own config (stored in the checkpoint)
is used. --temperature=0 (the default) is greedy decoding.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file; default: the checkpoint's.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample among the most likely tokens of mass p.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from zoo.cli import one_line_errors
  from zoo.generation.from_checkpoint import continue_text, restore_model
  with one_line_errors():
    model, config = restore_model(_WORKDIR.value, config=_CONFIG.value, step=_STEP.value)
    text = continue_text(model, config, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                         temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                         seed=_SEED.value)
  print(text)


if __name__ == "__main__":
  from zoo.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
