"""Tensor helpers the converters share: PyTorch `nn.Linear` weights <-> our `Linear`
kernels (which keep their head axes), name prefixes, tied tables, config reading.

A PyTorch linear stores W [out, in] and computes x W^T; our `Linear` stores a kernel
in_shape + out_shape (e.g. [d_model, heads, head_dim]) and computes x . K, so
K = W^T reshaped. HF `Conv1D` (GPT-2) already stores [in, out].
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from zoo.hub.hf import unsupported


def _tuple(s) -> Tuple[int, ...]:
  return (s,) if isinstance(s, int) else tuple(s)


def linear_to_kernel(w, in_shape, out_shape) -> np.ndarray:
  """torch nn.Linear weight [out, in] -> our kernel in_shape + out_shape."""
  w = np.asarray(w)
  in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
  if w.shape != (math.prod(out_shape), math.prod(in_shape)):
    raise ValueError(f"linear weight of shape {w.shape} does not fit {in_shape} -> {out_shape}")
  return np.ascontiguousarray(w.T).reshape(in_shape + out_shape)


def kernel_to_linear(k, n_in: int = 1) -> np.ndarray:
  """Our kernel in_shape + out_shape (n_in input axes) -> torch nn.Linear weight [out, in]."""
  k = np.asarray(k)
  return np.ascontiguousarray(k.reshape(math.prod(k.shape[:n_in]), -1).T)


def conv1d_to_kernel(w, in_shape, out_shape) -> np.ndarray:
  """HF Conv1D weight [in, out] -> our kernel in_shape + out_shape (no transpose)."""
  w = np.asarray(w)
  in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
  if w.shape != (math.prod(in_shape), math.prod(out_shape)):
    raise ValueError(f"Conv1D weight of shape {w.shape} does not fit {in_shape} -> {out_shape}")
  return np.ascontiguousarray(w).reshape(in_shape + out_shape)


def kernel_to_conv1d(k, n_in: int = 1) -> np.ndarray:
  """Our kernel in_shape + out_shape -> HF Conv1D weight [in, out]."""
  k = np.asarray(k)
  return np.ascontiguousarray(k.reshape(math.prod(k.shape[:n_in]), -1))


def prefix_of(tensors: Mapping[str, Any], probe: str, prefixes: Sequence[str]) -> str:
  """The name prefix ("model.", "transformer.", "") under which `probe` is stored: task
  heads save the backbone under a prefix, bare backbones without one."""
  for p in prefixes:
    if p + probe in tensors:
      return p
  raise ValueError(f"no {probe!r} under any of the prefixes {list(prefixes)}; tensors start "
                   f"with {sorted(tensors)[:8]}")


def tied_copy_check(tensors: Mapping[str, Any], name: str, table: np.ndarray,
                    field: str = "tie_word_embeddings") -> None:
  """A tied checkpoint may still store the head (`name`); it must equal the embedding table."""
  if name in tensors:
    head = np.asarray(tensors[name])
    if head.shape != np.shape(table) or not np.array_equal(
        head.astype(np.float32), np.asarray(table).astype(np.float32)):
      raise unsupported(field, True, f"{name} is stored and differs from the embedding table")


def all_zero(x) -> bool:
  return not np.any(np.asarray(x))


def get(hf_config: Mapping[str, Any], key: str, default: Any = None) -> Any:
  """hf_config[key], `default` when absent or null (HF's own defaults for missing fields)."""
  value = hf_config.get(key)
  return default if value is None else value


def require(hf_config: Mapping[str, Any], key: str, allowed, why: str,
            default: Any = None) -> Any:
  """hf_config[key] (or `default`), an `unsupported` error naming the field unless the value
  is one of `allowed`."""
  value = get(hf_config, key, default)
  if value not in allowed:
    raise unsupported(key, value, why)
  return value


def float_or_none(x: Optional[Any]) -> Optional[float]:
  return None if x is None else float(x)


def conv_to_patch_kernel(w) -> np.ndarray:
  """torch Conv2d weight [d, C, P, P] (stride P, a patch embedding) -> our patch kernel
  [P, P, C, d]: `zoo.vision.vit.patchify` flattens each patch (row, column, channel)."""
  w = np.asarray(w)
  if w.ndim != 4 or w.shape[2] != w.shape[3]:
    raise ValueError(f"patch conv weight must be [d, C, P, P], got {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def patch_kernel_to_conv(k) -> np.ndarray:
  """Our patch kernel [P, P, C, d] -> torch Conv2d weight [d, C, P, P]."""
  return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


# HF `hidden_act` -> our MLP activation (layers/mlp.py): the exact function, never a near one.
HF_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu",
                  "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
ZOO_TO_HF_ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh",
                         "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}


def activation_to_zoo(hf_config: Mapping[str, Any], key: str = "hidden_act",
                      default: str = "gelu") -> str:
  """hf_config[key] -> our activation name; one we lack is an `unsupported` error."""
  return HF_ACTIVATIONS[require(hf_config, key, HF_ACTIVATIONS, "no exact equivalent in "
                                f"layers/mlp.py; supported: {sorted(HF_ACTIVATIONS)}", default)]


def refuse_unexportable(cfg, checks, architecture: str) -> None:
  """checks: (field, ok, what) triples; the first with ok False is an error naming
  `model.<field>` and what `architecture` has instead."""
  for field, ok, what in checks:
    if not ok:
      raise ValueError(f"model.{field}={getattr(cfg, field, None)!r}: {architecture} has {what}")


def plain_mha_checks(cfg, *, equal_heads: bool) -> list:
  """The export checks (for `refuse_unexportable`) every architecture here shares: every layer
  'mha' without family options; with equal_heads, as many KV heads as query heads and
  head_dim = d_model / num_heads."""
  from zoo.model_config import parse_pattern
  heads = cfg.num_heads
  checks = [("attention", set(parse_pattern(cfg.attention, cfg.num_layers)) == {"mha"},
             "only 'mha' layers"),
            ("attention_options", not cfg.attention_options, "no family options")]
  if equal_heads:
    checks += [("num_kv_heads", (cfg.num_kv_heads or heads) == heads,
                "as many KV heads as query heads"),
               ("head_dim", (cfg.head_dim or cfg.d_model // heads) * heads == cfg.d_model,
                "head_dim = d_model / num_heads")]
  return checks
