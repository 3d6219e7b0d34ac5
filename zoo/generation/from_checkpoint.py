"""Generation from a trained run: restore the latest (or a given) checkpoint of a workdir and
continue a text prompt, tokenised with the run's own tokenizer (`data.tokenizer`).

The prompt is `bos + encode(text)` when the run wrapped its documents in bos
(`data.add_bos`, the default), so the model sees a prompt shaped like its training
documents; generation stops at the tokenizer's eos (where it has one) and the
continuation is decoded without it. The parameters come from `zoo.hub.load_run` (no
optimizer state is read); the run's stored config is used unless --config is given,
which must then be compatible with the checkpoint, as in eval.py.
"""

from __future__ import annotations

import json
from typing import Optional, Tuple

import zoo.data
from zoo.generation.decoding import generate


def restore_model(workdir: str, *, config=None, step: Optional[int] = None) -> Tuple[object, object]:
  """(model with the checkpoint's parameters, the run's config) of `workdir`; `config`, when
  given, must be compatible with the checkpoint's (as in eval.py)."""
  import zoo.hub
  from zoo.training import checkpointing
  from zoo.training.loop import resolve_config

  stored, step = zoo.hub.checkpoint.run_config(workdir, step)
  if config is None:
    config = stored
  else:
    config = resolve_config(config)
    ckpt = checkpointing.Checkpointer(workdir)
    try:
      ckpt.check_compatible(json.loads(config.to_json()))
    finally:
      ckpt.close()
  model, _ = zoo.hub.load_run(workdir, step=step)
  return model, config


def continue_text(model, config, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 0) -> str:
  """The model's continuation of `prompt` as text (without the stop token)."""
  if not hasattr(model, "decode_step") or config.model.get("name") == "captioner":
    raise ValueError(f"model.name={config.model.get('name')!r} does not continue text prompts; "
                     "generate.py runs language models (llama_lm)")
  tokenizer = zoo.data.get_tokenizer(config.data)
  ids = list(tokenizer.encode(prompt))
  if config.data.get("add_bos", True) and tokenizer.bos_id is not None:
    ids = [int(tokenizer.bos_id)] + ids
  if not ids:
    raise ValueError("--prompt is empty and the tokenizer has no bos token to start from")
  stop = () if tokenizer.eos_id is None else (int(tokenizer.eos_id),)
  pad = 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)
  tokens, lengths = generate(model, [ids], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_tokens=stop, seed=seed, pad_id=pad)
  new = [int(t) for t in tokens[0, :int(lengths[0])]]
  if new and stop and new[-1] in stop:
    new = new[:-1]
  return tokenizer.decode(new)
