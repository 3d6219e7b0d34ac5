"""`segment_mask`: segment, parallel-context and multi-candidate masks, as mask data.

From "Uni-Encoder: A Fast and Accurate Response Selection Paradigm for
Generation-Based Dialogue Systems", "Structured Prompting: Scaling In-Context
Learning to 1,000 Examples" and "Attention Entropy is a Key Factor: An Analysis
of Parallel Context Encoding with Full-attention-based Pre-trained Language
Models". Layout of one sequence:

    [prefix][seg 1]...[seg N][query]

  * prefix tokens see the prefix (causally under a causal mask);
  * segment i sees the prefix and itself, never another segment;
  * query tokens see everything (prefix, every segment, earlier query tokens);
  * packed rows hold several such sequences; they never see each other.

Each token carries a group (0 = prefix, i = segment i, -1 = query) and the
dense rule (the specification, `segment_visible_dense`) is

    visible(t, j) = pack_t == pack_j
                    and (g_j == g_t or g_j == 0 or g_t == -1)
                    and (j <= t if causal)            (token order)

Positions (RoPE) -- choice: segments *share* positions, each continuing from
the prefix (Uni-Encoder's shared positional embeddings for candidates,
Structured Prompting's per-group positions): with `align="left"` segment i's
token j sits at P + j; with `align="right"` (Structured Prompting's
right-alignment, so every group ends next to the query) at P + (Lmax - L_i) + j.
Query tokens follow at P + Lmax + j.

Rescaling (option `rescale`, Structured Prompting): for query tokens the
weight of every segment key is divided by the number of segments N of that
sequence, i.e. a logit bias of -log N on segment keys relative to prefix and
query keys (the paper "multiplies the attention scores of the test input by
M"; same softmax; applying it relative to a shared prefix is our choice).
Attention Entropy's remedies (sinks, selective attention) are other families
(`sinks`, `selective`) and compose with this mask.

Fast path (memory-efficient flash, no [T, T] array): the rules of
`pallas_kernels/flash/masking.py` cannot express this layout in ONE call:
every rule there is either an equality of segment ids (ANDed) or a position
rule (causal / one static window / one chunk size) that the prefix may only
widen. "The query sees all segments while each segment sees only itself" needs
some queries to be exempt from the restriction other queries obey; with N >= 3
no single window works (a middle segment's window must exclude both
neighbours, the query's window must include them) and segment-id equality
cannot make a query match several groups. So the fast path makes TWO flash
calls, each pure mask data:

  1. segment rows (and prefix rows when bidirectional): `chunk_size = T` and
     `prefix_lengths = T` on *mask positions* pos' = g * T + rank (prefix: rank;
     query: (N+1) * T + rank), segment ids = pack ids. A chunk is a group; the
     prefix rule makes the prefix (pos' < T) visible to everyone; causal applies
     within the group. (The prefix rule also makes the prefix bidirectional for
     its own rows, so under a causal mask prefix rows come from call 2.)
  2. query rows (and prefix rows when causal): plain causal (token index)
     attention with segment ids = pack ids and, with `rescale`, a per-key bias
     [B, 1, 1, T] (no [T, T] array).

  The rows of each call that belong to the other kind are discarded (so this
  costs two passes over the rows; a kernel with the rule below needs one).

Missing rule (smallest general addition to masking.py, not made here): a
second pair of per-token group ids with
`visible &= (q_group == kv_group) | (kv_group == SHARED) | (q_group == GLOBAL)`
(SHARED keys -- the prefix -- are seen by every query, GLOBAL queries see every
key), conjoined with the existing segment-id (packing) equality. Tile skipping
stays cheap (min/max of the group ids per tile). `segment_visible_dense` is this
rule rendered densely; the reference uses it.

Limits: mask positions reach (N + 2) * T, so N * T must stay below 2**31.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import reference as flash_reference

PREFIX, QUERY = 0, -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentLayout:
  """Per-token description of [prefix][seg 1..N][query] rows; all arrays [B, T] int32.

  group: 0 prefix, i >= 1 segment i, -1 query. rank: index within (pack, group).
  positions: RoPE positions. pack: packed-sequence id. num_segments: N of the
  token's sequence (for `rescale`). Build with `segment_layout` / `pack_layouts`.
  """

  group: jax.Array
  rank: jax.Array
  positions: jax.Array
  pack: jax.Array
  num_segments: jax.Array

  @property
  def shape(self):
    return self.group.shape


def _np_layout(prefix: int, segments: Sequence[int], query: int, align: str):
  if align not in ("left", "right"):
    raise ValueError(f"model.attention_options.segment_align must be 'left' or 'right', got {align!r}")
  if prefix < 0 or query < 0 or any(l <= 0 for l in segments):
    raise ValueError(
        f"model.attention_options.segment_layout needs prefix >= 0, segment lengths > 0 and"
        f" query >= 0, got ({prefix}, {list(segments)}, {query})")
  lmax = max(segments, default=0)
  group, rank, pos = [], [], []
  group += [PREFIX] * prefix; rank += list(range(prefix)); pos += list(range(prefix))
  for i, l in enumerate(segments, start=1):
    start = prefix + (lmax - l if align == "right" else 0)
    group += [i] * l; rank += list(range(l)); pos += list(range(start, start + l))
  group += [QUERY] * query; rank += list(range(query))
  pos += list(range(prefix + lmax, prefix + lmax + query))
  n = len(group)
  return (np.array(group, np.int32), np.array(rank, np.int32), np.array(pos, np.int32),
          np.full((n,), len(segments), np.int32))


def segment_layout(prefix: int, segments: Sequence[int], query: int, *, batch: int = 1,
                   align: str = "left") -> SegmentLayout:
  """The layout of one [prefix][segments][query] sequence, repeated over `batch` rows."""
  g, r, p, n = _np_layout(int(prefix), [int(l) for l in segments], int(query), align)
  tile = lambda a: jnp.asarray(np.broadcast_to(a, (batch, a.shape[0])))
  return SegmentLayout(group=tile(g), rank=tile(r), positions=tile(p),
                       pack=tile(np.zeros_like(g)), num_segments=tile(n))


def pack_layouts(specs: Sequence[tuple], *, align: str = "left", pad_to: Optional[int] = None
                 ) -> SegmentLayout:
  """One row packing several (prefix, segments, query) sequences; pack ids 0, 1, ...

  `pad_to` appends padding tokens (their own pack id, a lone prefix) up to that length.
  """
  parts = [_np_layout(int(p), [int(l) for l in s], int(q), align) for p, s, q in specs]
  packs = [np.full_like(a[0], i) for i, a in enumerate(parts)]
  cols = [np.concatenate(c) for c in zip(*parts)] + [np.concatenate(packs)]
  t = cols[0].shape[0]
  if pad_to is not None and pad_to > t:
    extra = pad_to - t
    pad = [np.zeros(extra, np.int32), np.arange(extra, dtype=np.int32),
           np.arange(extra, dtype=np.int32), np.zeros(extra, np.int32),
           np.full(extra, len(specs), np.int32)]
    cols = [np.concatenate([c, e]) for c, e in zip(cols, pad)]
  g, r, p, n, k = (jnp.asarray(c)[None] for c in cols)
  return SegmentLayout(group=g, rank=r, positions=p, pack=k, num_segments=n)


def segment_visible_dense(layout: SegmentLayout, causal: bool = True) -> jax.Array:
  """The specification: boolean [B, 1, T, T] (True = visible). Reference and plots only."""
  g, k = layout.group, layout.pack
  gq, gk = g[:, :, None], g[:, None, :]
  vis = (k[:, :, None] == k[:, None, :]) & ((gq == gk) | (gk == PREFIX) | (gq == QUERY))
  if causal:
    t = g.shape[1]
    vis = vis & (jnp.arange(t)[None, None, :] <= jnp.arange(t)[None, :, None])
  return vis[:, None]


def _key_bias(layout: SegmentLayout) -> jax.Array:
  """-log N on segment keys, 0 elsewhere: [B, 1, 1, T] float32 (Structured Prompting rescale)."""
  n = jnp.maximum(layout.num_segments, 1).astype(jnp.float32)
  return jnp.where(layout.group > 0, -jnp.log(n), 0.0)[:, None, None, :]


def segment_attention(q, k, v, layout: SegmentLayout, *, causal: bool = True,
                      rescale: bool = False, scale: Optional[float] = None,
                      implementation: str = "auto") -> jax.Array:
  """Fast path: two flash calls on mask data (see the module doc). q/k/v [B, T, H, D]."""
  b, t = layout.shape
  if q.shape[:2] != (b, t) or k.shape[1] != t:
    raise ValueError(f"segment layout is {(b, t)} but q is {q.shape[:2]}, k has {k.shape[1]} keys")
  g, r = layout.group, layout.rank
  n_groups = jnp.max(g) + 1
  chunk_pos = jnp.where(g >= 0, g * t + r, (n_groups + 1) * t + r).astype(jnp.int32)
  seg_out = flash_api.flash_attention(
      q, k, v, scale=scale, implementation=implementation, is_causal=causal, chunk_size=t,
      prefix_lengths=jnp.full((b,), t, jnp.int32), q_positions=chunk_pos, kv_positions=chunk_pos,
      segment_ids=layout.pack)
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  query_out = flash_api.flash_attention(
      q, k, v, scale=scale, implementation=implementation, is_causal=causal,
      q_positions=idx, kv_positions=idx, segment_ids=layout.pack,
      bias=_key_bias(layout) if rescale else None)
  # Under a causal mask the prefix rule would make the prefix bidirectional for its own
  # rows; plain causal attention (call 2) is exactly right for them (the prefix comes first).
  from_second = (g == QUERY) | (g == PREFIX) if causal else (g == QUERY)
  return jnp.where(from_second[:, :, None, None], query_out, seg_out)


def segment_attention_reference(q, k, v, layout: SegmentLayout, *, causal: bool = True,
                                rescale: bool = False, scale: Optional[float] = None) -> jax.Array:
  """The specification: dense attention under `segment_visible_dense` (+ the rescale bias)."""
  from pallas_kernels.flash import masking
  b, t = layout.shape
  bias = None
  if rescale:
    bias = jnp.where((layout.group == QUERY)[:, None, :, None], _key_bias(layout), 0.0)
  return flash_reference.attention(
      q, k, v, mask_args=masking.make_mask_args(b, t, t, mask=segment_visible_dense(layout, causal)),
      bias=bias, scale=scale)


def layout_spec_from_option(value):
  """`segment_layout` option -> static (prefix, (lengths...), query), or None.

  Accepts (prefix, [segment lengths], query) or {'prefix': .., 'segments': [..], 'query': ..}.
  """
  if value is None:
    return None
  try:
    if isinstance(value, dict) or hasattr(value, "keys"):
      prefix, segments, query = value["prefix"], value["segments"], value["query"]
    elif isinstance(value, str):
      raise TypeError
    else:
      prefix, segments, query = value
    spec = (int(prefix), tuple(int(l) for l in segments), int(query))
  except (TypeError, ValueError, KeyError):
    raise ValueError(
        "model.attention_options.segment_layout must be (prefix, [segment lengths], query) or"
        f" {{'prefix': .., 'segments': [..], 'query': ..}}, got {value!r}") from None
  return spec


@registry.register("segment_mask")
class SegmentMaskAttention(MultiHeadAttention):
  """`mha` under the [prefix][segments][query] mask.

  Options (`model.attention_options.<name>`): segment_layout ((prefix, [lengths],
  query); None: plain `mha`), segment_align ("left" | "right"), rescale (bool,
  False). A `layout=` keyword at call time overrides the option (e.g. packed rows
  from `pack_layouts`). With a layout, RoPE uses the layout's positions and the
  `positions` argument is ignored; the mask argument contributes only `causal`.
  """

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.align = cfg.option("segment_align", "left")
    self.rescale = cfg.bool_option("rescale", False)
    self.layout_spec = layout_spec_from_option(cfg.option("segment_layout", None))
    if self.layout_spec is not None:
      _np_layout(*self.layout_spec, self.align)  # validates now, not at the first call
    elif self.align not in ("left", "right"):
      raise ValueError(
          f"model.attention_options.segment_align must be 'left' or 'right', got {self.align!r}")

  def __call__(self, x: jax.Array, *, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None,
               layout: Optional[SegmentLayout] = None) -> jax.Array:
    if layout is None and self.layout_spec is not None:
      layout = segment_layout(*self.layout_spec, align=self.align)
    if layout is None:
      return super().__call__(x, mask=mask, positions=positions)
    cfg = self.cfg
    causal = cfg.causal if mask is None else mask.causal
    if mask is not None and (mask.segment_ids is not None or mask.window is not None
                             or mask.chunk_size is not None or mask.prefix_lengths is not None
                             or mask.kv_lengths is not None):
      raise ValueError("segment_mask builds its own mask from the segment layout; pack sequences"
                       " with segment_mask.pack_layouts instead of passing segment ids/windows")
    if cfg.window is not None:
      raise ValueError("segment_mask does not combine with model.window")
    b, t = x.shape[:2]
    if layout.shape[1] != t:
      raise ValueError(f"model.attention_options.segment_layout covers {layout.shape[1]} tokens,"
                       f" the input has {t}")
    if layout.shape[0] != b:
      layout = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (b, t)), layout)
    q, k, v = self.qkv(x)
    q, k = self.positional(q, k, layout.positions, layout.positions)
    if cfg.implementation == "reference":
      o = segment_attention_reference(q, k, v, layout, causal=causal, rescale=self.rescale)
    else:
      o = segment_attention(q, k, v, layout, causal=causal, rescale=self.rescale,
                            implementation=cfg.implementation)
    return self.out(o)
