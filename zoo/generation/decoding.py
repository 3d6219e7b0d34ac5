"""`generate`: autoregressive decoding of a batch of prompts with a KV cache.

A model that generates follows the protocol of `zoo.language.llama.DecoderLM`
(and `zoo.multimodal.captioner.Captioner`):

    cache          = model.init_cache(batch, capacity, dtype)
    logits, cache  = model.prefill(tokens [B, T], cache, lengths=[B], **conditioning)
    logits, cache  = model.decode_step(tokens [B, 1], cache)

Prompts of different lengths are right-padded to T; sequence b's positions
start at 0 and its cache length after prefill is its own length L_b, so its
first new token is sampled from the prefill logits at L_b - 1 and sits at
position L_b. Each step then:

    token_b = sample(logits_b)            (`sampling.sample`: greedy, temperature, top-k, top-p)
    token_b = pad_id                      once sequence b has emitted a stop token
    logits  = decode_step(token)          one cached step for the whole batch

The whole loop (prefill, then a `lax.while_loop` that ends when every sequence
has stopped or max_new_tokens are out) is one jitted function, compiled once per
model structure and settings. A stop token is kept in the output and counted in
the length; what follows it is pad_id.

`generate_without_cache` is the reference: the same sampling (same keys) over
the full forward pass recomputed at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.generation import sampling


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static settings of a generation (hashable: a jit cache key)."""

  max_new_tokens: int
  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  stop_tokens: Tuple[int, ...] = ()
  pad_id: int = 0
  return_logits: bool = False

  def __post_init__(self):
    if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) != self.max_new_tokens \
        or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
    sampling.check_settings(self.temperature, self.top_k, self.top_p)
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

  def sample(self, key, logits):
    return sampling.sample(key, logits, temperature=self.temperature, top_k=self.top_k,
                           top_p=self.top_p)


def batch_prompts(prompts, lengths=None, pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """A list of token lists (or a [B, T] array with `lengths`) -> right-padded int32 [B, T] and
  lengths [B]; every prompt needs at least one token (the first new token is read off it)."""
  if isinstance(prompts, (list, tuple)) and lengths is None:
    if not prompts:
      raise ValueError("prompts is empty; give at least one prompt")
    seqs = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    lengths = np.array([len(s) for s in seqs], np.int32)
    tokens = np.full((len(seqs), max(1, lengths.max())), pad_id, np.int32)
    for b, s in enumerate(seqs):
      tokens[b, :len(s)] = s
  else:
    tokens = np.asarray(prompts, np.int32)
    if tokens.ndim != 2:
      raise ValueError(f"prompts must be a list of token lists or a [batch, T] array, got "
                       f"shape {tokens.shape}")
    lengths = (np.full((tokens.shape[0],), tokens.shape[1], np.int32) if lengths is None
               else np.asarray(lengths, np.int32))
    if lengths.shape != (tokens.shape[0],):
      raise ValueError(f"lengths must be [batch] = ({tokens.shape[0]},), got {lengths.shape}")
    if lengths.size and lengths.max() > tokens.shape[1]:
      raise ValueError(f"lengths must be <= the prompts' width {tokens.shape[1]}, got "
                       f"{int(lengths.max())}")
  empty = np.flatnonzero(lengths < 1)
  if empty.size:
    raise ValueError(f"prompt {int(empty[0])} is empty; every prompt needs at least one token "
                     "(e.g. the tokenizer's bos id)")
  return tokens, lengths


def _conditioning(images):
  return {} if images is None else {"images": images}


def check_model(model, images) -> None:
  """The generation protocol, and images exactly for the models that read them."""
  for method in ("init_cache", "prefill", "decode_step"):
    if not hasattr(model, method):
      raise ValueError(f"{type(model).__name__} has no {method}(); generate runs models with "
                       "init_cache / prefill / decode_step (DecoderLM, Captioner)")
  takes_images = "images" in inspect.signature(model.prefill).parameters
  if takes_images and images is None:
    raise ValueError(f"{type(model).__name__} is conditioned on images; pass images=[B, H, W, C]")
  if images is not None and not takes_images:
    raise ValueError(f"images= was given but {type(model).__name__} reads no images")


def _finish_step(settings: Settings, i, token, logits, carry):
  """Records token i (pad once done), the logits it came from, and who has stopped."""
  out, n, done, all_logits = carry
  token = jnp.where(done, settings.pad_id, token)
  out = out.at[:, i].set(token)
  n = n + (~done).astype(jnp.int32)
  if settings.return_logits:
    all_logits = all_logits.at[:, i].set(logits)
  if settings.stop_tokens:
    done = done | jnp.isin(token, jnp.asarray(settings.stop_tokens, jnp.int32))
  return token, (out, n, done, all_logits)


def _empty_outputs(settings: Settings, batch: int, vocab: int):
  n_new = settings.max_new_tokens
  logits = (jnp.zeros((batch, n_new, vocab), jnp.float32) if settings.return_logits
            else jnp.zeros((), jnp.float32))
  return (jnp.full((batch, n_new), settings.pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch,), bool), logits)


@functools.partial(nnx.jit, static_argnames=("settings",))
def _generate_cached(model, tokens, lengths, cache, images, key, *, settings: Settings):
  batch = tokens.shape[0]
  logits, cache = model.prefill(tokens, cache, lengths=lengths, **_conditioning(images))
  last = logits[jnp.arange(batch), lengths - 1]
  outputs = _empty_outputs(settings, batch, last.shape[-1])

  def cond(carry):
    i, _, _, _, outputs = carry
    return (i < settings.max_new_tokens) & ~jnp.all(outputs[2])

  def body(carry):
    i, key, last, cache, outputs = carry
    key, sub = jax.random.split(key)
    token, outputs = _finish_step(settings, i, settings.sample(sub, last), last, outputs)
    logits, cache = model.decode_step(token[:, None], cache)
    return i + 1, key, logits[:, 0], cache, outputs

  carry = (jnp.zeros((), jnp.int32), key, last, cache, outputs)
  *_, (out, n, _, all_logits) = jax.lax.while_loop(cond, body, carry)
  return out, n, all_logits


def generate(model: nnx.Module, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             stop_tokens: Sequence[int] = (), seed: int = 0, images=None, pad_id: int = 0,
             lengths=None, return_logits: bool = False, cache_dtype=None):
  """Continues each prompt by up to `max_new_tokens` tokens.

  prompts: a list of token lists of any lengths, or a [B, T] array with `lengths` [B].
  images: the conditioning images [B, H, W, C] of an image-conditioned model (captioner).
  Returns (tokens [B, max_new_tokens] int32, padded with pad_id after a stop token or the
  end, lengths [B] int32, stop token included) and, with return_logits, the float32
  logits [B, max_new_tokens, vocab] each token was sampled from.
  """
  settings = Settings(max_new_tokens, float(temperature), top_k, top_p, tuple(stop_tokens),
                      int(pad_id), bool(return_logits))
  check_model(model, images)
  tokens, lengths = batch_prompts(prompts, lengths, pad_id)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens, cache_dtype)
  out, n, all_logits = _generate_cached(
      model, jnp.asarray(tokens), jnp.asarray(lengths), cache,
      None if images is None else jnp.asarray(images), jax.random.key(seed), settings=settings)
  return (out, n, all_logits) if return_logits else (out, n)


def generate_without_cache(model: nnx.Module, prompts, *, max_new_tokens: int,
                           temperature: float = 0.0, top_k: Optional[int] = None,
                           top_p: Optional[float] = None, stop_tokens: Sequence[int] = (),
                           seed: int = 0, images=None, pad_id: int = 0, lengths=None,
                           return_logits: bool = False):
  """The reference of `generate`: the full forward (`model(tokens)` or `model(images, tokens)`)
  over every sequence so far, recomputed at each step; same arguments, keys and results."""
  settings = Settings(max_new_tokens, float(temperature), top_k, top_p, tuple(stop_tokens),
                      int(pad_id), bool(return_logits))
  tokens, lengths = batch_prompts(prompts, lengths, pad_id)
  batch, width = tokens.shape
  # Sequence b's token j sits at column j; the buffer's padding lies after every real token,
  # so causal attention never lets it reach the logits read at column L_b + i - 1.
  buf = jnp.full((batch, width + max_new_tokens), pad_id, jnp.int32).at[:, :width].set(tokens)
  lengths = jnp.asarray(lengths)
  rows = jnp.arange(batch)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, buf):
    m = nnx.merge(graphdef, state)
    return m(buf) if images is None else m(jnp.asarray(images), buf)

  key = jax.random.key(seed)
  last = forward(state, buf)[rows, lengths - 1]
  outputs = _empty_outputs(settings, batch, last.shape[-1])
  for i in range(max_new_tokens):
    if bool(jnp.all(outputs[2])):
      break
    key, sub = jax.random.split(key)
    token, outputs = _finish_step(settings, i, settings.sample(sub, last), last, outputs)
    buf = buf.at[rows, lengths + i].set(token)
    last = forward(state, buf)[rows, lengths + i]
  out, n, _, all_logits = outputs
  return (out, n, all_logits) if return_logits else (out, n)
