"""Attention probabilities of a whole model, for diagnostics: maps and sink mass.

    with probes.record_probs() as probs:
      model(tokens)                        # eagerly, not under jit
    probes.sink_mass(probs)                # mean weight on the first token

Inside `record_probs()`, every call of the `mha` core (`layers.attention.mha.mha`,
which `mha`, `gated`, `sqa` and every family built on it call) also computes its
probabilities [B, Hq, Tq, Tk] on the dense reference path and appends them,
in call order (layer 0 first). The recording is quadratic in T and happens
only inside the block; outside it `mha` runs the kernels untouched. It needs
eager execution: under `jit` the probabilities would be tracers, so a traced
call inside the block is an error rather than a silent gap.

Sink mass ("Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free"; "Efficient Streaming Language Models with
Attention Sinks"): the attention weight that queries give to the first token,

    sink_mass = mean over layers, heads, batch and queries i >= 1 of P[i, 0],

query 0 excluded (under a causal mask it can only attend to itself). A
model that parks weight on the first token when nothing is relevant has a
large sink mass; the gated paper reports that the output gate removes this.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import jax
import jax.numpy as jnp

_recording: Optional[List[jax.Array]] = None


@contextlib.contextmanager
def record_probs() -> Iterator[List[jax.Array]]:
  """Collects the probabilities of every `mha` core call made eagerly inside the block."""
  global _recording
  outer, _recording = _recording, []
  try:
    yield _recording
  finally:
    _recording = outer


def is_recording() -> bool:
  return _recording is not None


def record(probs_fn, q: jax.Array) -> None:
  """Appends `probs_fn()` when recording; `q` tells whether the call is traced."""
  if _recording is None:
    return
  if isinstance(q, jax.core.Tracer):
    raise RuntimeError("probes.record_probs() needs eager execution: call the model outside "
                       "jax.jit / nnx.jit (and with model.remat=False) inside the block")
  _recording.append(probs_fn())


def sink_mass(probs: List[jax.Array], sink: int = 0,
              query_mask: Optional[jax.Array] = None) -> float:
  """Mean weight on key `sink` over layers, heads, batch and queries after it (see module doc).

  query_mask: optional [B, Tq] bool, the queries to average over (e.g. not padding).
  """
  if not probs:
    raise ValueError("no attention probabilities were recorded (is the model's attention built "
                     "on the mha core, and was it called inside record_probs()?)")
  b, _, tq, _ = probs[0].shape
  keep = jnp.arange(tq) > sink
  keep = keep[None, :] if query_mask is None else keep[None, :] & query_mask.astype(bool)
  keep = jnp.broadcast_to(keep, (b, tq))[:, None, :].astype(jnp.float32)  # [B, 1, Tq]
  if not float(jnp.sum(keep)):
    raise ValueError(f"no query after position {sink} to average over")
  per_layer = [jnp.sum(p[..., sink].astype(jnp.float32) * keep) / (jnp.sum(keep) * p.shape[1])
               for p in probs]
  return float(jnp.mean(jnp.stack(per_layer)))
