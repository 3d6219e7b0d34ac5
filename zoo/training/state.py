"""The train state and how it is laid out on the mesh.

The state is a plain pytree {"step", "params", "opt_state"} with params as a
pure dict (nnx.split / nnx.merge around the model: STACK-NOTES measured NNX
graph traversal overhead in hot loops). Parameters are created directly in
their shardings (a jitted init with `out_shardings` from the logical-axis
rules), so a model never has to fit on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from zoo import registry
from zoo.training import sharding as shd
from zoo.training.optimizer import make_optimizer


@dataclasses.dataclass
class ModelSetup:
  graphdef: Any
  param_shardings: Any  # pure dict of NamedSharding
  abstract_model: nnx.Module
  tx: optax.GradientTransformation
  init_fn: Callable[[], Any]

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)


def make_model_setup(config, mesh: Mesh) -> ModelSetup:
  """Builds the abstract model (validating model.*), its shardings and the optimizer."""
  def build():
    return registry.build_model(config.model, seed=config.seed)

  abstract_model = nnx.eval_shape(build)
  graphdef, abs_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("models in the loop must hold only nnx.Param state")
  specs = shd.param_specs(abs_params, mesh)
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  tx = make_optimizer(config.optimizer, config.total_steps)

  def init_params():
    return nnx.to_pure_dict(nnx.split(build(), nnx.Param, ...)[1])

  init_fn = jax.jit(init_params, out_shardings=param_shardings)
  return ModelSetup(graphdef, param_shardings, abstract_model, tx, init_fn)


def opt_state_shardings(setup: ModelSetup, mesh: Mesh):
  """Optimizer moments shard like their parameters; scalars (counts) are replicated."""
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_params = jax.eval_shape(setup.init_fn)
  abstract_opt = jax.eval_shape(setup.tx.init, abstract_params)
  return optax.tree_map_params(
      setup.tx, lambda _, sharding: sharding, abstract_opt, setup.param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def init_train_state(setup: ModelSetup, mesh: Mesh):
  params = setup.init_fn()
  opt_state = jax.jit(setup.tx.init, out_shardings=opt_state_shardings(setup, mesh))(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return {"step": step, "params": params, "opt_state": opt_state}
