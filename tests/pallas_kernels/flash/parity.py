"""Fast attention paths against the dense reference: outputs and every gradient.

Comparisons are relative to the reference's scale, max |x - ref| / max |ref|,
with tol = 1e-5 in float32 and 2e-2 for bfloat16 inputs (8-bit mantissa; the
reference runs in float32 on the same rounded inputs). Outputs, lse and the
gradients with respect to q, k, v (and bias, sinks, distance_bias, when
present) are checked, and every array must be finite (no NaN from empty rows).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash import reference
from tests.numerics import rel_err

F32_TOL = 1e-5
BF16_TOL = 2e-2

# The cases differ in structure, so each compiles its own program; XLA's LLVM
# optimisation dominates that time and changes no numerics, so it is turned
# down. Inputs come from numpy so that making them compiles nothing.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def inputs(b, tq, tk, hq, hkv, d, dv=None, dtype=jnp.float32, seed=0):
  dv = dv or d
  q = normal((seed, 0), (b, tq, hq, d), dtype)
  k = normal((seed, 1), (b, tk, hkv, d), dtype)
  v = normal((seed, 2), (b, tk, hkv, dv), dtype)
  do = normal((seed, 3), (b, tq, hq, dv), dtype)
  return q, k, v, do


def packed_segments(t):
  """Segment ids [2, t] of packed sequences (3 in batch row 0, 2 in row 1), as a pipeline packs."""
  seg = np.zeros((2, t), np.int32)
  seg[0, :12], seg[0, 12:30], seg[0, 30:] = 1, 2, 3
  seg[1, :20], seg[1, 20:] = 1, 2
  return jnp.asarray(seg)


def jit(fn, *args):
  """fn(*args), compiled once with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def compare(fast, q, k, v, do, *, mask_args=None, bias=None, sinks=None, distance_bias=None,
            logits_soft_cap=None, return_lse=False, tol=F32_TOL):
  """Runs `fast` and the reference (outputs and VJPs, in one jit) and checks them.

  `fast(q, k, v, *, mask_args, bias, sinks, distance_bias, logits_soft_cap,
  return_lse)` has `reference.attention`'s contract. Returns
  ((out, grads), (ref_out, ref_grads)).
  """
  diff_args = {"q": q, "k": k, "v": v}
  for name, x in (("bias", bias), ("sinks", sinks), ("distance_bias", distance_bias)):
    if x is not None:
      diff_args[name] = x
  dlse = normal(7, (q.shape[0], q.shape[2], q.shape[1])) if return_lse else None

  def run(fn, args):
    def f(args):
      return fn(args["q"], args["k"], args["v"], mask_args=mask_args, bias=args.get("bias"),
                sinks=args.get("sinks"), distance_bias=args.get("distance_bias"),
                logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    outs, vjp = jax.vjp(f, args)
    (grads,) = vjp((do, dlse) if return_lse else do)
    return outs, grads

  def ref_fn(q, k, v, **kw):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    outs = reference.attention(f32(q), f32(k), f32(v), **kw)
    return (outs[0].astype(q.dtype), outs[1]) if return_lse else outs.astype(q.dtype)

  (out, grads), (ref_out, ref_grads) = jit(
      lambda args: (run(fast, args), run(ref_fn, args)), diff_args)
  if return_lse:
    (out, lse), (ref_out, ref_lse) = out, ref_out
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert rel_err(np.where(finite, lse, 0), np.where(finite, ref_lse, 0)) < tol
  assert out.dtype == q.dtype and out.shape == ref_out.shape
  for name, x in [("out", out)] + sorted(grads.items()):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name} has non-finite values"
    assert x.shape == diff_args.get(name, out).shape
  assert rel_err(out, ref_out) < tol, ("out", rel_err(out, ref_out))
  for name in grads:
    assert grads[name].dtype == diff_args[name].dtype
    err = rel_err(grads[name], ref_grads[name])
    assert err < tol, (f"d{name}", err)
  return (out, grads), (ref_out, ref_grads)
