"""Finite flax nnx networks of an :class:`~rgnn.MLP`, and ensembles of them.

An :class:`Ensemble` holds ``M`` independently initialized networks as one flax ``GraphDef``
and a parameter ``State`` whose leaves carry a leading ensemble axis ``[M, ...]``: every
per-network computation is a ``jax.vmap`` over that axis under one ``jit``, never a Python
loop over networks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rgnn.architecture import MLP, MLPNetwork

__all__ = ["Ensemble", "ensemble"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ensemble:
    """``M`` finite networks of one architecture, parameters stacked on a leading axis.

    Attributes:
      state: the nnx parameter ``State``; every leaf is ``[M, ...]`` (for a
        :class:`rgnn.models.Model`, its parameter pytree with the same leading axis).
      graphdef: the nnx ``GraphDef`` shared by all members (static; ``None`` for a model).
      arch: the :class:`~rgnn.MLP` or :class:`rgnn.models.Model` (static).
      in_dim: input dimension ``n_0`` (static).
    """

    state: nnx.State
    graphdef: nnx.GraphDef = dataclasses.field(metadata=dict(static=True))
    arch: MLP = dataclasses.field(metadata=dict(static=True))
    in_dim: int = dataclasses.field(metadata=dict(static=True))

    @property
    def n_networks(self) -> int:
        """Number of members ``M``."""
        return jax.tree_util.tree_leaves(self.state)[0].shape[0]

    def member(self, i: int) -> MLPNetwork:
        """The ``i``-th network as a stand-alone nnx module (an MLP ensemble; for a model, the
        ``i``-th parameter pytree)."""
        if self.graphdef is None:
            return jax.tree_util.tree_map(lambda a: a[i], self.state)
        return nnx.merge(self.graphdef, jax.tree_util.tree_map(lambda a: a[i], self.state))


def ensemble(arch: MLP, in_dim: int, *, n_networks: int, key: jax.Array, dtype=None) -> Ensemble:
    """Initialize ``n_networks`` independent networks of ``arch`` (vmapped over keys).

    Args:
      arch: the architecture: an :class:`~rgnn.MLP`, or any :class:`rgnn.models.Model`, stax
        triple or nnx module (:func:`rgnn.models.as_model`; their parameters are drawn by
        their own ``init``, vmapped over keys).
      in_dim: input dimension ``n_0`` (the length of one flattened input row).
      n_networks: ensemble size ``M >= 1``.
      key: a ``jax.random`` key; member ``i`` uses ``jax.random.split(key, M)[i]``.
      dtype: parameter dtype (default: JAX's default float, float64 under ``enable_x64``).

    Returns:
      An :class:`Ensemble` whose parameter leaves are ``[M, ...]`` (the network axis first).
    """
    if isinstance(n_networks, bool) or not isinstance(n_networks, int) or n_networks < 1:
        raise ValueError(f"n_networks: expected an integer >= 1, got {n_networks!r}")
    return _ensemble_of_keys(arch, in_dim, jax.random.split(key, n_networks), dtype)


def _ensemble_of_keys(arch, in_dim: int, keys: jax.Array, dtype=None) -> Ensemble:
    """The ensemble whose member ``i`` is drawn from ``keys[i]`` (:func:`ensemble` with the
    keys given: ``ensemble(..., n_networks=M, key=k)`` is ``keys = jax.random.split(k, M)``)."""
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    n_networks = keys.shape[0]
    if not isinstance(arch, MLP):
        return _model_ensemble(arch, in_dim, n_networks, keys, dtype)
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: arch.network(in_dim, rngs=nnx.Rngs(0), dtype=dtype))
    )

    def init(k):
        return nnx.split(arch.network(in_dim, rngs=nnx.Rngs(params=k), dtype=dtype))[1]

    # vmapped but not jitted as a whole: the samplers are then dispatched as JAX's own jitted
    # functions, compiled once per parameter shape and reused by every architecture with the
    # same widths (compiling the float64 normal sampler dominates the cost of a small ensemble)
    state = jax.vmap(init)(keys)
    return Ensemble(state, graphdef, arch, in_dim)


def _model_ensemble(arch, in_dim, n_networks, keys, dtype) -> Ensemble:
    """The ensemble of a :class:`rgnn.models.Model`: ``init`` vmapped over the keys."""
    from rgnn.models import FlaxModel, as_model

    model = as_model(arch)
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim: expected an integer >= 1, got {in_dim!r}")
    if isinstance(model, FlaxModel) and not model.can_draw and n_networks > 1:
        raise ValueError(
            f"n_networks: {model.name!r} cannot draw new networks (expected a function "
            "make(width, *, rngs) for an ensemble), so expected n_networks=1, got "
            f"{n_networks}"
        )
    probe = jnp.zeros((2, in_dim), dtype)
    try:
        shapes = jax.eval_shape(model.init, jax.random.key(0), probe)
        model.check_output(shapes, probe)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a model that cannot run on these inputs
        raise ValueError(
            f"arch: the {model.kind} model {model.name!r} does not run on inputs of "
            f"{in_dim} features ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    state = jax.vmap(lambda k: model.init(k, probe))(keys)
    return Ensemble(state, None, model, in_dim)
