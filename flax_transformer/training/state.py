"""The train state: a plain pytree of arrays, split from the NNX model once.

`TrainState(step, params, opt_state, rng)` holds everything that changes during training and
everything a checkpoint must restore for a bitwise-identical resume: the batch counter, the
float32 parameters (an `nnx.State` whose leaves are plain arrays, `nnx.as_pure`), the Optax
state and the raw dropout key.

Plain arrays, not `nnx.Param` objects, because every leaf of a jitted function's arguments and
results is flattened and rebuilt on each call, in Python for Variables: ~7 ms of host time per
step for the 77M-parameter `base` model under Adam (3 x 218 Variables), time a GPU running small
batches waits for. `nnx.merge` accepts the plain state; the step rebuilds the Variables inside
its trace.
The model's structure (`graphdef`, one for training and one for evaluation) and its other
variables (`rest`: the dropout streams, reseeded every step) live in `ModelParts`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import TransformerConfig
from ..nn import Transformer


class TrainState(NamedTuple):
    """step: int32 count of training batches seen; params: nnx.State of the model's Params'
    values (plain arrays); opt_state: the Optax state; rng: uint32 raw key data of the dropout
    base key."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray


class ModelParts(NamedTuple):
    """The static halves of the split model: graphdefs in train and eval mode, other state,
    and the model's config (the steps check their batches against it)."""

    train_graphdef: Any
    eval_graphdef: Any
    rest: Any
    config: TransformerConfig

    def model(self, params, *, train: bool = False) -> Transformer:
        """A Transformer with `params` merged in (eval mode: dropout off)."""
        graphdef = self.train_graphdef if train else self.eval_graphdef
        return nnx.merge(graphdef, params, self.rest)


def _new_model(config: TransformerConfig, seed: int) -> Transformer:
    return Transformer(config, rngs=nnx.Rngs(params=seed, dropout=seed))


def init_model(config: TransformerConfig, seed: int, *,
               abstract: bool = False) -> tuple[ModelParts, Any]:
    """(ModelParts, params) of a fresh Transformer; parameters are drawn from `seed`.

    params: an `nnx.State` of plain arrays (`nnx.as_pure`); `nnx.merge` takes it as it is.
    With `abstract`, params are `jax.ShapeDtypeStruct`s and nothing is drawn: the target to
    restore a checkpoint into (~0.7 s instead of ~3 s of eager initialisers on a CPU). The
    other state (the dropout streams) is then computed alone, equal to the eager one."""
    if abstract:
        model = nnx.eval_shape(lambda: _new_model(config, seed))
    else:
        model = _new_model(config, seed)
    model.train()
    train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if abstract:  # jit drops the initialisers, whose results it does not return
        rest = jax.jit(lambda: nnx.split(_new_model(config, seed), nnx.Param, ...)[2])()
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    for leaf in jax.tree.leaves(params):
        if leaf.dtype != jnp.float32:
            raise ValueError(
                f"training keeps parameters in float32, got {leaf.dtype}; set "
                "TransformerConfig.param_dtype='float32' (dtype may stay bfloat16 for compute)"
            )
    return ModelParts(train_graphdef, eval_graphdef, rest, config), nnx.as_pure(params)


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: the optimizer state of `params` and the dropout key of `seed`. Abstract params
    (`init_model(..., abstract=True)`) give an abstract state, a restore target."""
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        return jax.eval_shape(lambda p: init_train_state(p, tx, seed), params)
    dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(dropout_key),
    )


def abstract_train_state(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state` (a restore target that allocates nothing).

    Each leaf is placed where `state`'s is (this process's first device for host values), so
    a checkpoint saved on any number of devices is read onto this process's: without a
    sharding, orbax would rebuild the saved one and fail on a machine with fewer devices."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.ShapeDtypeStruct):
            shape, dtype = x.shape, x.dtype
        else:
            shape, dtype = jnp.shape(x), jnp.result_type(x)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=here if sharding is None else sharding)

    return jax.tree.map(abstract, state)


def count_params(params) -> int:
    """Number of scalars in the parameter tree."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
