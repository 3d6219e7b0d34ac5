"""The cuDNN fused attention behind `jax.nn.dot_product_attention(implementation="cudnn")`.

A baseline and an option, not a kernel of ours: NVIDIA's flash attention
through XLA's cuDNN custom call. It implements a subset of the contract, and
`is_supported` admits only that subset: float16/bfloat16 on a GPU, equal
head dims (a multiple of 8, at most 128), causal or bidirectional with an
optional (left, right) window and key padding, a dense additive bias or a
dense boolean mask. No soft cap, sinks, distance bias, segments, prefix,
chunks, custom positions or lse. jax.nn aligns a causal mask top-left, ours
bottom-right, so a causal or windowed call needs Tq == Tk, where they agree.
Runs only when named (implementation="cudnn"); "auto" on GPU takes the
Pallas kernel, which supports every modification.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ALLOWED_MASKS = {"causal", "window", "padding", "dense"}


class CudnnBackend:
  name = "cudnn"

  def is_supported(self, call):
    if call.platform != "gpu":
      return False, "cuDNN attention runs on NVIDIA GPUs only"
    if call.q_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return False, f"cuDNN attention takes float16/bfloat16, not {call.q_dtype}"
    if call.head_dim != call.v_head_dim or call.head_dim % 8 or call.head_dim > 128:
      return False, f"head dims must be equal, a multiple of 8 and <= 128 (got {call.head_dim})"
    extra = set(call.mask_kinds) - _ALLOWED_MASKS
    if extra:
      return False, f"mask kinds {sorted(extra)} are not expressible in jax.nn's cuDNN call"
    if ({"causal", "window"} & set(call.mask_kinds)) and call.q_len != call.kv_len:
      return False, "a causal/windowed call with Tq != Tk (jax.nn aligns top-left, we bottom-right)"
    for flag, what in ((call.logits_soft_cap is not None, "soft cap"), (call.has_sinks, "sinks"),
                       (call.has_distance_bias, "distance bias"), (call.return_lse, "lse")):
      if flag:
        return False, f"{what} is not supported by cuDNN attention"
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks,
               distance_bias, return_lse, block_q, block_k):
    del call, logits_soft_cap, sinks, distance_bias, return_lse, block_q, block_k  # refused above
    m = mask_args
    kv_lengths = None
    if m.kv_lengths is not None:
      kv_lengths = m.kv_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=m.dense, scale=scale, is_causal=m.is_causal,
        key_value_seq_lengths=kv_lengths, local_window_size=m.window,
        implementation="cudnn")


CUDNN = CudnnBackend()
