"""What every model config shares: from a `config.model` ConfigDict to a frozen config
dataclass, per-layer family patterns and dtype names.

Unknown fields are an error naming them (a typo on the command line must not
be ignored); fields the loop fills from the data (`vocab_size`,
`num_classes`) are an error naming them when still unset;
`attention_options` ("gate=headwise,..." or a dict) becomes a sorted tuple
so the config stays hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple, Type, TypeVar

import jax.numpy as jnp
from flax import nnx

from layers.attention import registry as attention_registry
from layers.attention.config import AttentionConfig, parse_options
from layers.block import TransformerBlock

T = TypeVar("T")


def from_model_config(cls: Type[T], model_cfg, *, model: str, required: Sequence[str] = ()) -> T:
  d = {k: (v.to_dict() if hasattr(v, "to_dict") else v)
       for k, v in dict(model_cfg).items() if k != "name"}
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"unknown model fields for {model}: {['model.' + u for u in unknown]};"
                     f" known: {sorted(fields)}")
  if "attention_options" in d:
    d["attention_options"] = tuple(sorted(parse_options(d["attention_options"]).items()))
  for name in required:
    if d.get(name) is None:
      raise ValueError(f"model.{name} is not set (the loop fills it from the dataset)")
  return cls(**d)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_pattern(attention, num_layers: int) -> Tuple[str, ...]:
  """'mha' or 'a,b,c' (or a sequence) -> one family id per layer, the pattern cycled."""
  ids = [s.strip() for s in attention.split(",")] if isinstance(attention, str) else list(attention)
  if not ids or any(not i for i in ids):
    raise ValueError(f"model.attention={attention!r} names no family")
  known = attention_registry.names()
  for i in ids:
    if i not in known:
      raise ValueError(f"unknown attention family {i!r} in model.attention; registered: {known}")
  return tuple(ids[l % len(ids)] for l in range(num_layers))


def parse_dtype(name: str, field: str):
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def attention_config(cfg, layer: int, **fields) -> AttentionConfig:
  """Layer `layer`'s AttentionConfig from a model config's shared fields (head layout,
  positional encoding, implementation, dtypes, attention_options), with `fields` (causal,
  window, rope_base ...) added or overriding; errors name the model's settings."""
  base = dict(d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, positional=getattr(cfg, "positional", "nope"),
              implementation=cfg.implementation, layer=layer,
              use_bias=getattr(cfg, "use_bias", False),
              options=dict(getattr(cfg, "attention_options", ())))
  try:
    base.update(dtype=parse_dtype(cfg.dtype, "model.dtype"),
                param_dtype=parse_dtype(cfg.param_dtype, "model.param_dtype"))
    base.update(fields)
    return AttentionConfig(**base)
  except ValueError as e:
    raise ValueError(f"model: {e}") from None


def transformer_blocks(cfg, rngs: nnx.Rngs) -> nnx.List:
  """The model's stack of shared `TransformerBlock`s: layer l runs family l of the
  `cfg.attention` pattern with `cfg.attention_config(l)` and the model's MLP and norm.

  Optional config fields (a model declares those it offers): `mlp_activation`,
  `norm_position` ("pre" | "post"), `first_attn_norm` (False: layer 0 has no norm
  before attention)."""
  families = parse_pattern(cfg.attention, cfg.num_layers)
  try:
    return nnx.List([
        TransformerBlock(attention=families[l], attn_cfg=cfg.attention_config(l),
                         mlp_dim=cfg.mlp_dim, mlp_kind=cfg.mlp_kind,
                         mlp_activation=getattr(cfg, "mlp_activation", None), norm=cfg.norm,
                         norm_eps=cfg.norm_eps,
                         norm_position=getattr(cfg, "norm_position", "pre"),
                         attn_norm=l > 0 or getattr(cfg, "first_attn_norm", True), rngs=rngs)
        for l in range(cfg.num_layers)])
  except ValueError as e:
    raise ValueError(f"model: {e}") from None
