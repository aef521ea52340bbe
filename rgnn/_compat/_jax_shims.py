"""Small stand-ins for JAX names that neural-tangents 0.6.5 imports but JAX removed.

Only the rewritten neural-tangents source imports this module (see the rewrite table in
``rgnn._compat``); nothing here is exported to users and nothing is patched into ``jax``.
Each name says which removed JAX name it replaces.
"""

import builtins
import contextlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.interpreters import ad

__all__ = [
    "DShapedArray",
    "dtype_of",
    "eval_context_unless_traced",
    "linearize_to_jaxpr",
    "reducing_transposes",
    "safe_map",
    "safe_zip",
]


def safe_map(f: Callable[..., Any], *args: Any) -> list[Any]:
    """Replaces ``jax.util.safe_map``: ``list(map(f, *args))`` that insists on equal lengths."""
    args = [list(a) for a in args]
    n = len(args[0])
    for a in args[1:]:
        if len(a) != n:
            raise ValueError(f"safe_map: length mismatch: {[len(a) for a in args]}")
    return list(builtins.map(f, *args))


def safe_zip(*args: Any) -> list[tuple[Any, ...]]:
    """Replaces ``jax.util.safe_zip``: ``list(zip(*args))`` that insists on equal lengths."""
    return list(builtins.zip(*args, strict=True))


def dtype_of(x: Any) -> np.dtype:
    """Replaces ``jnp.dtype(x)`` for a parameter leaf: its ``.dtype``, else ``np.dtype(x)``.

    ``np.dtype(array)`` is deprecated for JAX arrays.
    """
    return x.dtype if hasattr(x, "dtype") else np.dtype(x)


def eval_context_unless_traced(*args: Any) -> contextlib.AbstractContextManager[Any]:
    """Replaces ``jax.core.eval_context()`` around a computation on ``args``.

    neural-tangents computes and caches an eigendecomposition eagerly inside
    ``eval_context()``. Under current (stackless) JAX, entering it while ``args`` are tracers
    of an enclosing ``vmap``/``jit`` raises ``UnexpectedTracerError``; then the computation
    must stay in the enclosing trace, which is what older JAX did.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
        return contextlib.nullcontext()
    return jax.core.eval_context()


class DShapedArray:
    """Replaces ``jax.core.DShapedArray`` (dynamic shapes, removed from JAX).

    neural-tangents only tests ``type(aval) is core.DShapedArray``; no aval has this type, so
    that test is now always false, which is what it was for every static shape.
    """


# ``jax.interpreters.ad.reducing_transposes`` left the public module; only a few collective
# primitives ever registered such a rule, and none of them appears in a stax network.
reducing_transposes: dict[Any, Callable[..., Any]] = getattr(ad, "reducing_transposes", {})


class _UnknownPartialVal:
    """Stands for a ``PartialVal`` of an output whose tangent is not a symbolic zero."""

    @staticmethod
    def is_known() -> bool:
        return False


def linearize_to_jaxpr(
    fn: Callable[..., Any], *primals_in: Any
) -> tuple[Any, list[_UnknownPartialVal], Any, list[Any]]:
    """Replaces the call ``ad.linearize(flatten_fun_nokwargs(lu.wrap_init(fn)), ...)``.

    The private ``ad.linearize`` changed signature and return value. This computes the same
    four things from public JAX: the primal outputs (a pytree), one partial value per flat
    output (all unknown: every output cotangent is kept), the linear tangent ``Jaxpr`` whose
    ``invars`` are the flat input tangents, and the residual constants bound to its
    ``constvars``.
    """
    primals_out, f_jvp = jax.linearize(fn, *primals_in)
    tangents_in = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), primals_in)
    closed = jax.make_jaxpr(f_jvp)(*tangents_in)
    pvals = [_UnknownPartialVal() for _ in closed.jaxpr.outvars]
    return primals_out, pvals, closed.jaxpr, list(closed.consts)
