"""Pooling heads: a sequence of token features [B, T, d] -> one vector per example (+ classifier).

A pooling head turns the tokens of an encoder into the input of a classifier
(an attentive probe on a frozen ViT, a sentence vector over RNN/Transformer
states). Heads are registered by id in `POOLING` and built with
`make_pooling(name, d_model, num_classes=..., rngs=..., **options)`:

  "mean"             masked mean over tokens (the linear-probe / GAP baseline, here)
  "attentive_probe"  efficient probing (EP) and the MHA "MAP" probe
                     (layers/attention/attentive_probe.py)
  "lowrank_pool"     low-rank multi-head context pooling, LAMA
                     (layers/attention/lowrank_pool.py)

Every head is constructed as `Head(d_model, *, num_classes=None, ..., rngs)` and
called as `head(x, *, mask=None, lengths=None)`; it returns logits
[B, num_classes] when `num_classes` is set, else the pooled vector
[B, head.out_dim]. `head.pool(x, mask=, lengths=)` always returns the pooled
vector. Padded tokens are described by `lengths` [B] (tokens 0..len-1 are
real: the kernels' `kv_lengths`) and/or a boolean `mask` [B, T] (True = real
token); both given means both apply. A row with no real token pools to zeros.
`stop_gradient=True` cuts the gradient to the features (a probe on a frozen
encoder); the heads' own parameters still train.

This module also holds the pieces the heads share: mask validation, the
masked softmax / mean of the jnp paths, the flash-kernel mask arguments and
the classifier.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.registry import registrar
from layers.linear import Linear
from pallas_kernels.flash import api as flash_api

POOLING: Dict[str, type] = {}
register_pooling = registrar(POOLING, "pooling head", "pooling_id")

# Modules whose import registers heads (imported on first lookup, so importing
# this module stays cheap and free of cycles).
_HEAD_MODULES = ("layers.attention.attentive_probe", "layers.attention.lowrank_pool")


def _load_heads() -> None:
  import importlib
  for name in _HEAD_MODULES:
    importlib.import_module(name)


def get(name: str) -> type:
  _load_heads()
  if name not in POOLING:
    raise ValueError(f"unknown pooling head {name!r} (model.pooling); registered: {names()}")
  return POOLING[name]


def names() -> List[str]:
  _load_heads()
  return sorted(POOLING)


def make_pooling(name: str, d_model: int, *, rngs: nnx.Rngs, num_classes: Optional[int] = None,
                 **options) -> nnx.Module:
  """Builds the head `name`; an option it does not take is an error naming the option."""
  cls = get(name)
  params = inspect.signature(cls.__init__).parameters
  allowed = sorted(p for p, spec in params.items()
                   if spec.kind == spec.KEYWORD_ONLY and p not in ("rngs", "num_classes"))
  for key in options:
    if key not in allowed:
      raise ValueError(f"model.pooling_options.{key} is not an option of pooling {name!r}; "
                       f"its options are {allowed}")
  return cls(d_model, num_classes=num_classes, rngs=rngs, **options)


# ----------------------------------------------------------------------------- validation


def check_positive(name: str, value, *, what: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive integer{what}, got {value!r}")
  return value


def check_choice(name: str, value, choices) -> str:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")
  return value


def check_implementation(implementation: str) -> str:
  impls = flash_api.available_implementations()
  if implementation not in impls:
    raise ValueError(f"implementation={implementation!r} is not one of {impls}")
  return implementation


def check_tokens(x: jax.Array, d_model: Optional[int] = None) -> Tuple[int, int]:
  """x must be floating [B, T, d_model]; returns (B, T)."""
  if x.ndim != 3:
    raise ValueError(f"token features must be [batch, tokens, d_model], got shape {x.shape}")
  if d_model is not None and x.shape[-1] != d_model:
    raise ValueError(f"token features have width {x.shape[-1]}, the head was built for "
                     f"d_model={d_model}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"token features must be floating, got {x.dtype}")
  if x.shape[1] == 0:
    raise ValueError("token features have no tokens (T = 0)")
  return x.shape[0], x.shape[1]


def check_token_mask(mask: Optional[jax.Array], lengths: Optional[jax.Array], batch: int,
                     length: int) -> None:
  if mask is not None:
    if tuple(mask.shape) != (batch, length):
      raise ValueError(f"mask must be [batch, tokens] = {(batch, length)} (True = real token), "
                       f"got {tuple(mask.shape)}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = real token), got {mask.dtype}")
  if lengths is not None:
    if tuple(lengths.shape) != (batch,):
      raise ValueError(f"lengths must be [batch] = {(batch,)}, got {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"lengths must be integers, got {lengths.dtype}")


def valid_tokens(mask: Optional[jax.Array], lengths: Optional[jax.Array], batch: int,
                 length: int) -> Optional[jax.Array]:
  """The real tokens as a boolean [B, T] (None: all are real)."""
  check_token_mask(mask, lengths, batch, length)
  valid = mask
  if lengths is not None:
    by_length = jnp.arange(length)[None, :] < lengths[:, None]
    valid = by_length if valid is None else valid & by_length
  return valid


def flash_mask_kwargs(mask: Optional[jax.Array], lengths: Optional[jax.Array], batch: int,
                      num_queries: int, length: int) -> dict:
  """`flash_attention` mask arguments for M pooling queries over T tokens, never a dense mask.

  lengths -> kv_lengths; a boolean mask -> a segment-id pair (every query in
  segment 1, a real token in 1, a padded one in 0), which every backend reads
  per tile.
  """
  check_token_mask(mask, lengths, batch, length)
  kwargs = {}
  if lengths is not None:
    kwargs["kv_lengths"] = lengths.astype(jnp.int32)
  if mask is not None:
    kwargs["segment_ids"] = (jnp.ones((batch, num_queries), jnp.int32), mask.astype(jnp.int32))
  return kwargs


# ----------------------------------------------------------------------------- jnp pieces


def masked_softmax(scores: jax.Array, valid: Optional[jax.Array], axis: int = -1) -> jax.Array:
  """softmax over `axis` where `valid` (broadcasting to scores); a row with none valid is 0."""
  s = scores.astype(jnp.float32)
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  if valid is not None:
    p = jnp.where(valid, p, 0.0)
  total = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def masked_mean(x: jax.Array, mask: Optional[jax.Array] = None,
                lengths: Optional[jax.Array] = None) -> jax.Array:
  """Mean over the real tokens: x [B, T, d] -> [B, d] (0 for a row with no real token)."""
  b, t = check_tokens(x)
  valid = valid_tokens(mask, lengths, b, t)
  if valid is None:
    return jnp.mean(x, axis=1)
  w = valid.astype(x.dtype)
  count = jnp.sum(w, axis=1, keepdims=True)
  return jnp.einsum("bt,btd->bd", w, x) / jnp.where(count > 0, count, 1).astype(x.dtype)


def features(x: jax.Array, stop_gradient: bool) -> jax.Array:
  """The encoder features a head reads: with stop_gradient, no gradient flows back into them."""
  return jax.lax.stop_gradient(x) if stop_gradient else x


class Classifier(nnx.Module):
  """logits = pooled W + b: [B, width] -> [B, num_classes] (kernel axes ("embed", "vocab"))."""

  def __init__(self, width: int, num_classes: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    check_positive("num_classes", num_classes)
    self.linear = Linear(width, num_classes, axes=("embed", "vocab"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    return self.linear(pooled)


class PoolingHead(nnx.Module):
  """Shared call protocol: subclasses set `d_model`, `out_dim`, `stop_gradient`, `classifier`
  (or None) and implement `pool_features(x, mask, lengths) -> [B, out_dim]`."""

  d_model: int
  out_dim: int
  stop_gradient: bool
  classifier: Optional[Classifier]

  def _init_head(self, d_model: int, out_dim: int, num_classes: Optional[int], stop_gradient: bool,
                 dtype, param_dtype, rngs: nnx.Rngs) -> None:
    if not isinstance(stop_gradient, bool):
      raise ValueError(f"stop_gradient must be true or false, got {stop_gradient!r}")
    self.d_model, self.out_dim, self.stop_gradient = d_model, out_dim, stop_gradient
    self.num_classes = num_classes
    self.classifier = (None if num_classes is None else
                       Classifier(out_dim, num_classes, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs))

  def pool(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
           lengths: Optional[jax.Array] = None) -> jax.Array:
    """The pooled vector [B, out_dim]."""
    b, t = check_tokens(x, self.d_model)
    check_token_mask(mask, lengths, b, t)
    return self.pool_features(features(x, self.stop_gradient), mask, lengths)

  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
               lengths: Optional[jax.Array] = None) -> jax.Array:
    pooled = self.pool(x, mask=mask, lengths=lengths)
    return pooled if self.classifier is None else self.classifier(pooled)

  def pool_features(self, x, mask, lengths) -> jax.Array:  # pragma: no cover (abstract)
    raise NotImplementedError


@register_pooling("mean")
class MeanPool(PoolingHead):
  """Masked mean over the real tokens (global average pooling), then the optional classifier."""

  def __init__(self, d_model: int, *, num_classes: Optional[int] = None,
               stop_gradient: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    check_positive("d_model", d_model)
    self._init_head(d_model, d_model, num_classes, stop_gradient, dtype, param_dtype, rngs)

  def pool_features(self, x, mask, lengths):
    return masked_mean(x, mask, lengths)


def num_params(module: nnx.Module) -> int:
  """Trainable parameter count of a module."""
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


__all__: Tuple[str, ...] = (
    "POOLING", "Classifier", "MeanPool", "PoolingHead", "flash_mask_kwargs", "get",
    "make_pooling", "masked_mean", "masked_softmax", "names", "num_params", "register_pooling",
    "valid_tokens")
