"""Norms, MLPs, the linear projection and embeddings against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.embeddings import Embed
from layers.linear import Linear
from layers.mlp import MLP
from layers.norms import LayerNorm, RMSNorm, make_norm

X = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3 + 1


def test_rmsnorm_formula_and_bf16_stats():
  y = RMSNorm(8)(X)
  np.testing.assert_allclose(y, X / jnp.sqrt(jnp.mean(X ** 2, -1, keepdims=True) + 1e-6), rtol=1e-5)
  yb = RMSNorm(8)(X.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(yb.astype(jnp.float32), y, rtol=2e-2, atol=2e-2)


def test_layernorm_formula():
  y = LayerNorm(8)(X)
  mu, var = X.mean(-1, keepdims=True), X.var(-1, keepdims=True)
  np.testing.assert_allclose(y, (X - mu) / jnp.sqrt(var + 1e-6), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
    make_norm("batchnorm", 8, eps=1e-6)


@pytest.mark.parametrize("kind,act", [("swiglu", jax.nn.silu),
                                      ("geglu", lambda x: jax.nn.gelu(x, approximate=True))])
def test_gated_mlps(kind, act):
  mlp = MLP(8, 16, kind=kind, rngs=nnx.Rngs(0))
  w_up, w_gate, w_down = mlp.up.kernel[...], mlp.gate.kernel[...], mlp.down.kernel[...]
  np.testing.assert_allclose(mlp(X), (act(X @ w_gate) * (X @ w_up)) @ w_down, rtol=1e-5, atol=1e-5)


def test_linear_keeps_head_axes_and_logical_names():
  lin = Linear(8, (2, 4), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(0))
  y = lin(X)
  np.testing.assert_allclose(y, jnp.einsum("btd,dhk->bthk", X, lin.kernel[...]), rtol=1e-5)
  assert lin.kernel.get_metadata()["logical_axes"] == ("embed", "heads", "head_dim")
  std = float(jnp.std(Linear(512, 512, axes=("a", "b"), rngs=nnx.Rngs(1)).kernel[...]))
  assert abs(std - 512 ** -0.5) / 512 ** -0.5 < 0.05  # fan-in init


def test_tied_embedding_attend_is_the_transpose():
  emb = Embed(11, 8, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 4, 10]])
  np.testing.assert_array_equal(emb(tokens), emb.embedding[...][tokens])
  np.testing.assert_allclose(emb.attend(X), X @ emb.embedding[...].T, rtol=1e-5)


@pytest.mark.parametrize("activation,fn", [
    ("gelu_exact", lambda x: 0.5 * x * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0)))),
    ("quick_gelu", lambda x: x * jax.nn.sigmoid(1.702 * x))])
def test_mlp_activation_overrides_the_kind(activation, fn):
  mlp = MLP(8, 16, kind="gelu", activation=activation, use_bias=True, rngs=nnx.Rngs(0))
  h = X @ mlp.up.kernel[...] + mlp.up.bias[...]
  np.testing.assert_allclose(mlp(X), fn(h) @ mlp.down.kernel[...] + mlp.down.bias[...],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown mlp activation 'gelu2'"):
    MLP(8, 16, kind="gelu", activation="gelu2", rngs=nnx.Rngs(0))


def test_block_post_norm_and_no_first_norm():
  from layers.attention.config import AttentionConfig
  from layers.block import TransformerBlock
  cfg = AttentionConfig(d_model=8, num_heads=2, causal=False, positional="nope")
  post = TransformerBlock(attention="mha", attn_cfg=cfg, mlp_dim=16, mlp_kind="gelu",
                          norm="layernorm", norm_position="post", rngs=nnx.Rngs(0))
  h = post.attn_norm(X + post.attention(X))
  np.testing.assert_allclose(post(X), post.mlp_norm(h + post.mlp(h)), rtol=1e-5, atol=1e-5)
  bare = TransformerBlock(attention="mha", attn_cfg=cfg, mlp_dim=16, attn_norm=False,
                          rngs=nnx.Rngs(0))
  h = X + bare.attention(X)
  np.testing.assert_allclose(bare(X), h + bare.mlp(bare.mlp_norm(h)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="norm_position='mid'"):
    TransformerBlock(attention="mha", attn_cfg=cfg, mlp_dim=16, norm_position="mid",
                     rngs=nnx.Rngs(0))
