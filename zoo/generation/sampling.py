"""Next-token sampling: pure functions of logits [..., V] (float32 in, tokens or filtered logits out).

    temperature:  logits / T              (T = 0 means greedy: argmax, no randomness)
    top-k:        keep exactly the k largest logits (ties broken by the lower index);
                  the rest become -inf
    top-p:        sort by probability p_(1) >= p_(2) >= ...; keep the smallest prefix
                  whose mass reaches p: token (i) stays iff sum_{j<i} p_(j) < p
                  ("The Curious Case of Neural Text Degeneration", Holtzman et al.)
    sample:       temperature, then top-k, then top-p, then a categorical draw

A filtered-out token has logit -inf, so it is never drawn. The most probable
token always survives every filter.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_settings(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
  """Errors name the argument at fault (--temperature, --top_k, --top_p in generate.py)."""
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
    raise ValueError(f"top_k must be a positive integer (or None), got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must lie in (0, 1] (or None), got {top_p!r}")


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  """logits / temperature (temperature > 0)."""
  return logits.astype(jnp.float32) / temperature


def _keep_at(logits: jax.Array, order: jax.Array, keep_sorted: jax.Array) -> jax.Array:
  """logits with -inf where `keep_sorted` (in the order `order` of the last axis) is False."""
  keep = jnp.zeros(logits.shape, bool)
  keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Exactly min(k, V) logits kept per row (the k largest), the rest -inf."""
  k = min(int(k), logits.shape[-1])
  _, idx = jax.lax.top_k(logits, k)
  return _keep_at(logits, idx, jnp.ones(idx.shape, bool))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """The smallest set of most probable tokens whose probability mass is >= p; the rest -inf."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < p
  keep_sorted = keep_sorted.at[..., 0].set(True)  # the most probable token, even at rounding edges
  return _keep_at(logits, order, keep_sorted)


def filter_logits(logits: jax.Array, *, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
  """The logits a sample is drawn from: temperature, then top-k, then top-p (temperature > 0)."""
  logits = apply_temperature(logits, temperature)
  if top_k is not None:
    logits = top_k_filter(logits, top_k)
  if top_p is not None and top_p < 1:
    logits = top_p_filter(logits, top_p)
  return logits


def sample(key: jax.Array, logits: jax.Array, *, temperature: float = 0.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
  """logits [..., V] -> tokens [...] int32: argmax when temperature == 0, else a draw from
  `filter_logits` (one independent draw per row from `key`)."""
  check_settings(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
