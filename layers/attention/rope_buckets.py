"""`rope_buckets`: Attention Buckets, parallel RoPE passes at several bases
(`model.positional="rope_buckets"`).

"Fortify the Shortest Stave in Attention: Enhancing Context Awareness of Large
Language Models for Effective Tool Use" (code: github.com/AlibabaResearch/
DAMO-ConvAI, attention-buckets/). The attention a RoPE model gives to a
context position follows a waveform set by the RoPE base; a key in a trough
is overlooked. Attention Buckets runs the input through N parallel processes,
process n with its own base beta_n, so the troughs of one process meet the
peaks of another.

Layer form implemented here. For bases beta_1 .. beta_N, with R_beta the
rotation of layers/attention/rope.py at base beta (the other model.rope_*
settings apply to every pass), per query head h and its KV head g(h):

    P^n_h = softmax(R_{beta_n}(q_h) R_{beta_n}(k_g)^T / sqrt(d) + M)
    O_h   = (1/N) sum_n P^n_h V_g  =  ((1/N) sum_n P^n_h) V_g

The two forms are equal because V is shared by the passes (Derived), so
"averaging the outputs" and "averaging the attention weights" are the same
rule here. One bucket (N = 1, base beta) is `rope` at base beta exactly.

The paper's combination (confirmed from the authors' code,
attention-buckets/modeling_llama.py, `LlamaForCausalLM.forward` under
`set_base_mean`, and `LlamaAttention` under `_set_base_batch`): each process
is a *complete forward pass* of the pretrained model, with base beta_n in
every layer and the same weights (the passes are rows of one batch), and only
the next-token logits z^n are combined, weighted by each pass's confidence:

    w = softmax_n(max_v z^n_v),      z = sum_n w_n z^n

(`weight = softmax(max(all_logits, -1))`, then `weight @ all_logits`). It is
an inference-time method for a model trained with plain RoPE. That rule is
`combine_bucket_logits` below: run a `positional="rope"` model once per base
(`model.rope_base=beta_n`, same parameters) and combine the logits.

Our choices, where the paper's procedure does not fit a per-layer hook: the
zoo's positional encodings act inside one attention layer, which has no
vocabulary logits to take a confidence from, so the layer form combines its
passes with uniform weights 1/N (the equation above) in every layer. It is a
trainable layer like any other encoding (the gradient reaches q, k and v
through every pass); it is not the paper's whole-model ensemble, which needs
no layer of its own.

Bases (option rope_buckets_bases): default (10000, 17500, 18000, 19000,
20000, 25000), the tool-use set of the code's inference/config.py; its RAG
experiments use (10000, 13000, 16000, ..., 28000) (base_rag/test_nq_kl.py).
`model.rope_base` is not read by this encoding.

Kernel: each pass is one `layers.attention.mha.mha` call (the flash
dispatch), so every backend runs it; N passes cost N times the score and
value FLOPs of `rope` and hold N rotated copies of q and k; V is not copied.
(`train_flops_per_token` of the layer still counts one pass.)
Only the `mha` core runs it (families that override `core` refuse encodings
that own the attention). Step (a) returns q [N, B, Tq, Hq, D] and
k [N, B, Tk, Hkv, D], one rotated copy per base, which `attention` reads.

Options (`model.attention_options.<name>`):
  rope_buckets_bases (default above): the RoPE bases, one pass each. From the
      command line either a bracketed list, which `parse_options` reads as a
      Python literal (commas inside brackets do not split options),
        --config.model.attention_options="rope_buckets_bases=(10000,17500,25000)"
      or numbers separated by ';' (a string),
        --config.model.attention_options="rope_buckets_bases=10000;17500;25000"
      A single number gives one bucket.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.positional import PositionalEncoding, register_positional, rope_settings
from layers.attention.rope import apply_rope, rope_frequencies
from pallas_kernels.flash import api as flash_api

# The code's tool-use bases (attention-buckets/inference/config.py).
DEFAULT_BASES = (10_000.0, 17_500.0, 18_000.0, 19_000.0, 20_000.0, 25_000.0)
_OPTION = "model.attention_options.rope_buckets_bases"


def parse_bases(value) -> Tuple[float, ...]:
  """Bases from a number, a list / tuple of numbers, or a string "10000;17500;..."."""
  if isinstance(value, str):
    try:
      bases = tuple(float(p) for p in value.replace(";", " ").replace(",", " ").split())
    except ValueError:
      raise ValueError(f"{_OPTION}={value!r} must be numbers separated by ';' "
                       "(or a bracketed list such as (10000,17500))") from None
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    bases = (float(value),)
  elif isinstance(value, (list, tuple)) and all(
      isinstance(b, (int, float)) and not isinstance(b, bool) for b in value):
    bases = tuple(float(b) for b in value)
  else:
    raise ValueError(f"{_OPTION} must be a list of numbers, got {value!r}")
  if not bases or any(not b > 0 for b in bases):
    raise ValueError(f"{_OPTION} must be one or more positive numbers, got {value!r}")
  return bases


def rotate_buckets(q: jax.Array, k: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                   bases: Sequence[float], **rope_kwargs) -> Tuple[jax.Array, jax.Array]:
  """One rotated copy per base: q [B,Tq,Hq,D] -> [N,B,Tq,Hq,D], k [B,Tk,Hkv,D] -> [N,B,Tk,Hkv,D].

  rope_kwargs: the other `apply_rope` settings (scaling, scaling_type, ...), shared by the passes.
  """
  qs = jnp.stack([apply_rope(q, q_positions, base=b, **rope_kwargs) for b in bases])
  ks = jnp.stack([apply_rope(k, kv_positions, base=b, **rope_kwargs) for b in bases])
  return qs, ks


def bucket_passes(q_stack: jax.Array, k_stack: jax.Array, v: jax.Array,
                  mask: Optional[Mask] = None, *, scale: Optional[float] = None,
                  implementation: str = "auto") -> jax.Array:
  """(1/N) sum_n mha(q_stack[n], k_stack[n], v): one kernel call per pass, mean in float32.

  Each pass is the call `layers.attention.mha.mha` makes (the flash dispatch; importing mha
  here would be circular: mha imports the positional registry, which imports this module).
  """
  mask = Mask.bidirectional() if mask is None else mask
  if q_stack.ndim != 5 or k_stack.ndim != 5 or q_stack.shape[0] != k_stack.shape[0]:
    raise ValueError(f"q_stack [N,B,Tq,Hq,D] and k_stack [N,B,Tk,Hkv,D] must share N, got "
                     f"{tuple(q_stack.shape)} and {tuple(k_stack.shape)}")
  n = q_stack.shape[0]
  total = None
  for i in range(n):
    out = flash_api.flash_attention(q_stack[i], k_stack[i], v, scale=scale,
                                    implementation=implementation, **mask.kernel_args())
    out = out.astype(jnp.float32)
    total = out if total is None else total + out
  return (total / n).astype(q_stack.dtype)


def rope_buckets_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                           kv_positions: jax.Array, mask: Optional[Mask] = None, *,
                           bases: Sequence[float] = DEFAULT_BASES, scale: Optional[float] = None,
                           implementation: str = "auto", **rope_kwargs) -> jax.Array:
  """The pure function: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], positions [B,T] -> [B,Tq,Hq,D].

  O = (1/N) sum_n softmax(R_{beta_n}(q) R_{beta_n}(k)^T scale + M) V over `bases`;
  implementation as `mha` ("reference" runs the dense form).
  """
  qs, ks = rotate_buckets(q, k, q_positions, kv_positions, bases, **rope_kwargs)
  return bucket_passes(qs, ks, v, mask, scale=scale, implementation=implementation)


def combine_bucket_logits(logits: jax.Array) -> jax.Array:
  """The paper's (the code's) combination of N whole-model passes: logits [N, ..., V] -> [..., V].

  w = softmax over n of max_v logits[n, ..., v] (per position), result sum_n w_n logits[n].
  """
  z = logits.astype(jnp.float32)
  w = jax.nn.softmax(jnp.max(z, axis=-1), axis=0)  # [N, ...]
  return jnp.sum(w[..., None] * z, axis=0).astype(logits.dtype)


@register_positional("rope_buckets")
class RoPEBuckets(PositionalEncoding):
  """N RoPE rotations of q and k (one per base), N attention passes, mean of their outputs."""

  owns_attention = True

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs
    if cfg.head_dim % 2:
      raise ValueError(f"positional='rope_buckets' needs an even head_dim, got {cfg.head_dim}")
    self.bases = parse_bases(cfg.option("rope_buckets_bases", DEFAULT_BASES))
    kwargs = rope_settings(cfg)  # validates the shared scaling settings
    kwargs.pop("base")  # model.rope_base is not read: the bases are the option's
    for b in self.bases:
      rope_frequencies(cfg.head_dim, b, **kwargs)
    self.kwargs = kwargs

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    return rotate_buckets(q, k, q_positions, kv_positions, self.bases, **self.kwargs)

  def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask, *,
                implementation: str = "auto") -> jax.Array:
    return bucket_passes(q, k, v, mask, implementation=implementation)
