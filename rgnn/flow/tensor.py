"""Labelled tensors: the index notation of the recursions, evaluated by einsum.

Every statistic of the perturbative flow is a tensor over the inputs of one set
(``[m, m, m, m]`` for the four-index ones), and every recursion is a sum of products of such
tensors with some indices contracted. :class:`L` carries an array with one letter per axis, so
the rules in :mod:`rgnn.flow.rules` read like their formulas: ``A * B`` multiplies with
matching letters identified (an outer product over the others) and :func:`ein` contracts a
product onto the letters it is asked for. Nothing here loops over entries: each product is
one ``jnp.einsum``, so the traced program has a fixed size independent of the number of
inputs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax


class L:
    """An array with a letter per axis (``ix``)."""

    __slots__ = ("x", "ix")

    def __init__(self, x, ix: str):
        if x.ndim != len(ix) or len(set(ix)) != len(ix):
            raise ValueError(f"labels {ix!r} do not fit an array of shape {x.shape}")
        self.x = x
        self.ix = ix

    def __mul__(self, other):
        if isinstance(other, L):
            out = self.ix + "".join(c for c in other.ix if c not in self.ix)
            return L(self._spread(out) * other._spread(out), out)
        return L(self.x * other, self.ix)

    __rmul__ = __mul__

    def __neg__(self):
        return L(-self.x, self.ix)

    def __add__(self, other):
        if not isinstance(other, L):
            return L(self.x + other, self.ix)
        if set(other.ix) == set(self.ix):
            return L(self.x + other.to(self.ix).x, self.ix)
        out = self.ix + "".join(c for c in other.ix if c not in self.ix)
        return L(self._spread(out) + other._spread(out), out)

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-other)

    def _spread(self, out: str):
        """Broadcast to the letters ``out`` (missing letters as axes of size 1)."""
        x = self.to("".join(c for c in out if c in self.ix)).x
        shape = []
        it = iter(x.shape)
        for c in out:
            shape.append(next(it) if c in self.ix else 1)
        return x.reshape(shape)

    def to(self, ix: str) -> L:
        """The same tensor with its axes in the order ``ix`` (a permutation of its letters)."""
        if ix == self.ix:
            return self
        if sorted(ix) != sorted(self.ix):
            raise ValueError(f"cannot reorder {self.ix!r} as {ix!r}")
        return L(jnp.einsum(f"{self.ix}->{ix}", self.x), ix)

    def rename(self, ix: str) -> L:
        """The same array under new letters (position by position)."""
        return L(self.x, ix)


def take(x, idx):
    """``x[idx]`` for a tuple of constant (NumPy) index arrays on the leading axes, as one
    gather: no bounds normalisation of the indices (they are known to be in range)."""
    idx = np.broadcast_arrays(*(np.asarray(i) for i in idx))
    k = len(idx)
    ind = np.stack([i.ravel() for i in idx], -1).astype(np.int32)
    dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(1, 1 + x.ndim - k)),
        collapsed_slice_dims=tuple(range(k)),
        start_index_map=tuple(range(k)),
    )
    out = lax.gather(
        x,
        jnp.asarray(ind),
        dn,
        slice_sizes=(1,) * k + x.shape[k:],
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return out.reshape(idx[0].shape + x.shape[k:])


def extract(x, ix: str) -> L:
    """The entries of ``x`` (axes labelled ``ix``, letters may repeat) on the diagonal that
    the repeated letters name, e.g. ``extract(v, "aabc")`` is ``v[a, a, b, c]`` labelled
    ``"abc"``: one gather with index arrays built at trace time (an einsum with repeated
    letters would build identity masks instead)."""
    out = "".join(dict.fromkeys(ix))
    if out == ix:
        return L(x, ix)
    m = x.shape[0]
    grids = np.indices((m,) * len(out), sparse=True)
    pos = {c: i for i, c in enumerate(out)}
    return L(take(x, tuple(grids[pos[c]] for c in ix)), out)


SMALL = 4096
"""Products with at most this many entries (all letters together) are formed by broadcasting;
larger ones by ``einsum``."""


def sum_last(x):
    """``x`` summed over its last axis by pairwise elementwise additions of slices: a float32
    ``reduce`` over a few entries per output goes to YNNPACK on XLA:CPU, at a cost of
    hundreds of nanoseconds per entry (a quarter of a pair chunk's time in the update rules);
    additions are fused with the product that feeds them."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        s = x[..., :h] + x[..., h : 2 * h]
        if n % 2:
            s = jnp.concatenate([s, x[..., 2 * h :]], axis=-1)
        x = s
    return x[..., 0]


def ein(out: str, *terms) -> L:
    """The product of ``terms`` (:class:`L` or scalars) contracted onto the letters ``out``."""
    scale = 1.0
    ts = []
    for t in terms:
        if isinstance(t, L):
            ts.append(t)
        else:
            scale = scale * t
    letters = "".join(dict.fromkeys("".join(t.ix for t in ts)))
    sizes = {c: n for t in ts for c, n in zip(t.ix, t.x.shape, strict=True)}
    if math.prod(sizes[c] for c in letters) <= SMALL:
        # a few inputs (pairs, single inputs): one broadcast product and a sum, which the
        # compiler fuses; tiny contractions as dot_generals would be looped over the batch
        allix = out + "".join(c for c in letters if c not in out)
        prod = ts[0]._spread(allix)
        for t in ts[1:]:
            prod = prod * t._spread(allix)
        x = prod
        for _ in range(len(allix) - len(out)):
            x = sum_last(x)
        return L(scale * x, out)
    spec = ",".join(t.ix for t in ts) + "->" + out
    x = jnp.einsum(spec, *(t.x for t in ts), optimize="optimal" if len(ts) > 2 else False)
    return L(scale * x, out)
