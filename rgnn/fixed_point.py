"""The Gaussian (UV) fixed point: per-layer infinite-width NNGP and NTK kernels.

.. math::

    K^{(1)}_{ab} &= C_b + C_W \\frac{1}{n_0} \\sum_j x_{ja} x_{jb}, \\qquad
    \\Theta^{(1)}_{ab} = \\lambda_b^{(1)}
        + \\lambda_W^{(1)} \\frac{1}{n_0} \\sum_j x_{ja} x_{jb},\\\\
    K^{(l+1)}_{ab} &= C_b + C_W \\langle \\sigma(z_a) \\sigma(z_b) \\rangle_{K^{(l)}},\\\\
    \\Theta^{(l+1)}_{ab} &= \\lambda_b^{(l+1)} + \\lambda_W^{(l+1)}
        \\langle \\sigma(z_a) \\sigma(z_b) \\rangle_{K^{(l)}}
        + C_W \\langle \\sigma'(z_a) \\sigma'(z_b) \\rangle_{K^{(l)}} \\Theta^{(l)}_{ab}

A residual layer (:mod:`rgnn.architecture`, PDLT appendix B) maps every kernel to
``xi^2 (the plain layer's map) + gamma^2 (the kernel below)``: the branch
``xi (b + W sigma(z))`` and the shortcut ``gamma z`` are uncorrelated at infinite width
(``W`` has mean zero), and so are their parameter gradients, so no cross term survives
(:func:`_residual_update`); the neural-tangents view is ``FanOut(2)``,
``parallel(serial(act, Dense, xi), gamma)``, ``FanInSum`` per block.

(PDLT eq. 4.118 for K, eq. 9.4 for Theta; the learning-rate scalings ``lambda`` depend on the
parameterization, see :mod:`rgnn.architecture`). The expectation over the 2x2 Gaussian with
covariance ``[[K_aa, K_ab], [K_ab, K_bb]]`` uses the activation's closed form where one exists
(:mod:`rgnn.activations`) and Gauss-Hermite quadrature otherwise (:mod:`rgnn.gaussian`).

Two backends compute the same numbers: ``"native"`` (one jitted pass through the layers, all
layers at once) and ``"neural_tangents"`` (``stax`` kernel functions, one per prefix of the
network, run under :mod:`rgnn._compat`).

How the native pass is organised (for speed; benchmarks/README.md has the numbers): one
``lax.scan`` step per layer, whose update is one function (:func:`_layer`, over
:func:`_next_nngp` and :func:`_next_ntk`); with ``x2`` omitted the kernel is symmetric and the
recursion runs on the blocks on and above the diagonal only (:class:`_Layout`), each layer
mirrored into the full ``[N, N]`` result as the scan writes it (the result is written once);
``K`` and ``Theta`` are carried as one complex array so that XLA computes both, and their
maps once, in one loop over the entries; the
angles of the closed forms come from a polynomial arctangent that XLA vectorizes
(:mod:`rgnn._arctan`; ``jnp.arctan2`` is a scalar library call per entry on the CPU).

Exact where exact is possible, honest elsewhere:

* The diagonal is the single-input recursion, with the activation's own map on one input
  (:func:`diag_maps`; for the relu family ``K' = C_b + C_W A_2 K``,
  ``Theta' = lambda_b + lambda_W A_2 K + C_W A_2 Theta``, ``A_2 = (1 + a^2) / 2``), never the
  pair map at a correlation that rounding leaves a few ulps off 1; (anti)parallel pairs of
  the relu family have angle exactly ``0`` (``pi``) (:mod:`rgnn.activations`). Both agree with
  their closed forms to roundoff (``<= 1.3e-14`` relative at depth 10, float64).
* A quadrature result carries an estimate of its error (``FixedPoint.quadrature_error``), and
  :func:`fixed_point` warns when it exceeds ``rtol``.
* A request that needs more than ``memory_limit`` bytes is refused before anything is
  allocated.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn import gaussian
from rgnn._validate import check_pair
from rgnn.architecture import MLP, Recursion
from rgnn.flow import table as flow_table

__all__ = [
    "FixedPoint",
    "fixed_point",
    "pair_maps",
    "diag_maps",
    "BACKENDS",
    "MEMORY_LIMIT",
    "QUADRATURE_RTOL",
]

BACKENDS = ("native", "neural_tangents")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Per-layer infinite-width kernels; layer ``l`` (1-based) at index ``l - 1``.

    Attributes:
      nngp: ``[L+1, N1, N2]`` the NNGP kernel ``K^{(l)}(x1_a, x2_b)``.
      ntk: ``[L+1, N1, N2]`` the NTK ``Theta^{(l)}(x1_a, x2_b)`` of one unit of layer ``l``.
      nngp_diag1: ``[L+1, N1]`` the variances ``K^{(l)}(x1_a, x1_a)``.
      nngp_diag2: ``[L+1, N2]`` the variances ``K^{(l)}(x2_b, x2_b)`` (equal to ``nngp_diag1``
        when ``x2`` is ``None``).
      backend: which backend computed it.
      quadrature_order: quadrature nodes per dimension (``0`` when closed forms were used).
      quadrature_error: the estimated largest quadrature error of an entry of ``nngp``,
        ``ntk`` or the diagonals, relative to the largest entry of the same kernel and layer,
        over all layers: ``0.0`` with closed forms, ``None`` where it was not estimated (under
        ``jit``/``vmap``, where the inputs have no values, or with ``rtol=math.inf``).
        :func:`fixed_point` recomputes entries at twice the order, every entry of a small
        kernel and otherwise a sample: entries spread over the correlations and norms of the
        inputs, and a grid of correlations over their range (a kink's error varies
        erratically with the correlation); the estimate is 3 times the largest difference. On
        the entries it recomputes that bounds the error of a rule converging like ``1/order``
        or faster (a kink's NTK) with room to spare; over the rest it is an estimate.
        Measured on a relu and a leaky relu written as callables (84 cases: digits and
        Gaussian inputs, ``x2`` or not, depths 3 and 10, orders 48 to 192), twice the
        difference already exceeded the largest true error over all entries in every case, by
        1.02 to 4.9 times.
    """

    nngp: jax.Array
    ntk: jax.Array
    nngp_diag1: jax.Array
    nngp_diag2: jax.Array
    backend: str = dataclasses.field(default="native", metadata=dict(static=True))
    quadrature_order: int = dataclasses.field(default=0, metadata=dict(static=True))
    quadrature_error: float | None = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def n_layers(self) -> int:
        """``L + 1``."""
        return self.nngp.shape[0]


def pair_maps(rec_or_act, k11, k22, k12, *, order: int = 96, rule: str = "trapezoid"):
    """``(<sigma sigma>, <sigma' sigma'>)`` under ``N(0, [[k11, k12], [k12, k22]])``, elementwise.

    Uses the activation's closed forms when it has them, else quadrature with ``order`` nodes
    per dimension (:mod:`rgnn.gaussian`).
    """
    act = rec_or_act.activation if isinstance(rec_or_act, Recursion) else rec_or_act
    if act.closed_form:
        return act.maps(k11, k22, k12)
    return gaussian.expect_pairs(
        [(act.fn, act.fn), (act.derivative, act.derivative)], k11, k22, k12, order=order, rule=rule
    )


def diag_maps(rec_or_act, k, *, order: int = 96, rule: str = "trapezoid"):
    """``(<sigma^2>, <sigma'^2>)`` under ``N(0, k)``, elementwise: the maps on one input.

    The activation's exact diagonal map when it has closed forms (for the relu family
    ``((1 + a^2) k / 2, (1 + a^2) / 2)``, never the pair map at ``rho = 1``), else
    one-dimensional quadrature with ``order`` nodes (:func:`rgnn.gaussian.expect`).
    """
    act = rec_or_act.activation if isinstance(rec_or_act, Recursion) else rec_or_act
    if act.closed_form:
        return act.diag_maps(k)
    return (
        gaussian.expect(lambda u: act.fn(u) ** 2, k, order=order, rule=rule),
        gaussian.expect(lambda u: act.derivative(u) ** 2, k, order=order, rule=rule),
    )


def _residual_inputs(rec: Recursion, dtype) -> tuple:
    """The scan inputs ``(gamma^2, xi^2)`` of layers ``2..L+1`` for a residual MLP, else ``()``."""
    if rec.shortcut is None:
        return ()
    return tuple(jnp.square(jnp.asarray(v[1:], dtype)) for v in (rec.shortcut, rec.branch))


def _residual_update(new, old, factors):
    """A residual layer (PDLT appendix B): every kernel becomes
    ``xi^2 (plain layer's map) + gamma^2 (the layer below's kernel)``,
    ``K' = xi^2 (C_b + C_W <s s>) + gamma^2 K`` and
    ``Theta' = xi^2 (lambda_b + lambda_W <s s> + C_W <s' s'> Theta) + gamma^2 Theta``."""
    g2, x2 = factors
    return tuple(x2 * a + g2 * b for a, b in zip(new, old, strict=True))


_BLOCK = 250
"""Target side of the blocks of the symmetric layout (:class:`_Layout`)."""

_MAX_BLOCKS = 16
"""At most this many blocks along each side of the symmetric layout."""


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where :func:`_native` keeps the kernel entries while it runs through the layers.

    The entries are ``[P, b1, b2]``: ``P`` blocks of ``b1 x b2`` entries of the ``[N1, N2]``
    kernel, block ``p`` at block row ``rows[p]`` and block column ``cols[p]``.

    * ``symmetric`` (``x2`` omitted): the kernel is symmetric. With one block (``nb = 1``,
      what :func:`_native` uses when every layer is written) every entry is computed and
      nothing is mirrored; with ``nb > 1`` (the output layer alone) only the blocks on and
      above the diagonal of an ``nb x nb`` grid of ``b x b`` blocks are computed, ``P = nb (nb + 1)
      / 2`` of them (``(nb + 1) / (2 nb)`` of the entries: 56% for ``N = 2000``, ``nb = 8``),
      the inputs padded to ``nb b`` with copies of the last one. :meth:`unpack` mirrors each
      layer into the full kernel as the scan writes it into the result.
    * otherwise one block is the whole kernel (``P = 1``, ``b1, b2 = N1, N2``).

    ``entrywise`` is the layout of :func:`_probe_flow`: entries ``[P]`` with their own
    variances ``[P]`` (``rows`` and ``cols`` are the identity).
    """

    n1: int
    n2: int
    nb: int = 1
    symmetric: bool = False
    entrywise: bool = False

    @staticmethod
    def of(n1: int, n2: int, *, same: bool) -> _Layout:
        if not same:
            return _Layout(n1, n2)
        return _Layout(n1, n1, max(1, min(_MAX_BLOCKS, round(n1 / _BLOCK))), symmetric=True)

    @property
    def b(self) -> int:
        """The side of a block of the symmetric layout."""
        return -(-self.n1 // self.nb)

    @property
    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Block row and block column of each block, ``([P], [P])``."""
        return np.triu_indices(self.nb)

    def pad(self, v):
        """``[N1, ...]`` -> ``[nb b, ...]``, padded with copies of the last row."""
        extra = self.nb * self.b - self.n1
        if not extra:
            return v
        return jnp.concatenate([v, jnp.broadcast_to(v[-1:], (extra,) + v.shape[1:])])

    def pack(self, full):
        """The entries ``[P, b, b]`` of a full symmetric ``[N1, N1]`` matrix (one matrix
        product gives layer 1: XLA's batched products of small blocks are far slower)."""
        full = jnp.pad(full, (0, self.nb * self.b - self.n1), mode="edge")
        grid = jnp.swapaxes(full.reshape(self.nb, self.b, self.nb, self.b), 1, 2)
        return grid[self.blocks]

    def rows(self, v):
        """Per-input values of ``x1`` ``[N1, ...]`` at the entries' rows: ``[P, b1, 1, ...]``."""
        if self.entrywise:
            return v
        if not self.symmetric:
            return v[None, :, None]
        v = self.pad(v).reshape((self.nb, self.b) + v.shape[1:])[self.blocks[0]]
        return v[:, :, None]

    def cols(self, v):
        """Per-input values of ``x2`` at the entries' columns: ``[P, 1, b2, ...]``."""
        if self.entrywise:
            return v
        if not self.symmetric:
            return v[None, None, :]
        v = self.pad(v).reshape((self.nb, self.b) + v.shape[1:])[self.blocks[1]]
        return v[:, None, :]

    def on_diagonal(self, at_pairs, at_inputs):
        """``at_pairs`` with the entries of an input with itself replaced by ``at_inputs``
        ``[N1]`` (symmetric layout; the others have no such entries and return ``at_pairs``)."""
        if not self.symmetric:
            return at_pairs
        r, c = self.blocks
        i = jax.lax.broadcasted_iota(jnp.int32, (1, self.b, self.b), 1)
        j = jax.lax.broadcasted_iota(jnp.int32, (1, self.b, self.b), 2)
        mask = jnp.asarray(r == c)[:, None, None] & (i == j)
        return jnp.where(mask, self.rows(at_inputs), at_pairs)

    def unpack(self, entries):
        """The full ``[N1, N2]`` kernel of one layer from its entries ``[P, b1, b2]``.

        For the symmetric layout, each block below the diagonal is the transpose of its
        mirror image: the blocks are transposed (``b x b`` tiles, which stay in cache), then
        every block of the full grid is taken from the blocks or their transposes (one gather
        of whole blocks), and the padding is cropped."""
        if not self.symmetric or self.nb == 1:
            return entries[0][: self.n1, : self.n2]
        r, c = self.blocks
        index = np.zeros((self.nb, self.nb), np.int32)
        index[r, c] = np.arange(r.size)
        index[c, r] = np.arange(r.size) + r.size  # below the diagonal: the transposes
        both = jnp.concatenate([entries, jnp.swapaxes(entries, -1, -2)])
        full = jnp.swapaxes(both[index], 1, 2).reshape(self.nb * self.b, self.nb * self.b)
        return full[: self.n1, : self.n1]


def _next_nngp(rec: Recursion, f):
    """``K^{(l+1)} = C_b + C_W <sigma sigma>`` (PDLT eq. 4.118)."""
    return rec.bias_var + rec.weight_var * f


def _next_ntk(rec: Recursion, lam, f, df, theta):
    """``Theta^{(l+1)} = lambda_b + lambda_W <sigma sigma> + C_W <sigma' sigma'> Theta^{(l)}``
    (PDLT eq. 9.4); ``lam = (lambda_b, lambda_W)`` of layer ``l + 1``."""
    return lam[0] + lam[1] * f + rec.weight_var * df * theta


def _layer(rec: Recursion, layout: _Layout, carry, lam, *, order: int, rule: str, tabulate: bool):
    """One layer of the recursion: ``carry = (K_12, Theta_12, K_11, K_22)`` of layer ``l``
    (the pairs in ``layout``, the variances of the inputs) to those of layer ``l + 1``, and the
    largest relative error of the correlation tables (``0`` without them).

    With the symmetric layout, the pairs of an input with itself take the maps on one input
    (:func:`diag_maps`), so that ``K_aa``, ``Theta_aa`` are exactly the scalar recursion."""
    k12, theta, k11, k22 = carry
    kw = dict(order=order, rule=rule)
    a, b = layout.rows(k11), layout.cols(k22)
    if tabulate:
        shape = k12.shape
        (f, df), err = flow_table.tabulated(
            lambda a, c, b: pair_maps(rec, a, b, c, **kw),
            jnp.broadcast_to(a, shape).ravel(),
            k12.ravel(),
            jnp.broadcast_to(b, shape).ravel(),
        )
        f, df = f.reshape(shape), df.reshape(shape)
    else:
        f, df = pair_maps(rec, a, b, k12, **kw)
        err = jnp.zeros((), k12.dtype)
    f11, df11 = diag_maps(rec, k11, **kw)
    f, df = layout.on_diagonal(f, f11), layout.on_diagonal(df, df11)
    f22 = f11 if layout.symmetric else diag_maps(rec, k22, **kw)[0]
    new = (
        _next_nngp(rec, f),
        _next_ntk(rec, lam, f, df, theta),
        _next_nngp(rec, f11),
        _next_nngp(rec, f22),
    )
    if rec.shortcut is not None:  # lam = (lambda_b, lambda_W, gamma^2, xi^2)
        new = _residual_update(new, carry, lam[2:])
    return new, err


@partial(jax.jit, static_argnames=("order", "rule", "same", "tabulate", "last"))
def _native(
    rec: Recursion,
    x1,
    x2,
    *,
    order: int,
    rule: str,
    same: bool,
    tabulate: bool = False,
    last: bool = False,
):
    """The recursion on all layers, one :func:`_layer` per step of a ``lax.scan``; with
    ``same`` inputs on the upper triangle of blocks of the kernel (:class:`_Layout`). With
    ``tabulate`` (``same`` inputs, quadrature activations) a layer whose inputs share one norm
    takes its off-diagonal maps from a table in the correlation (:mod:`rgnn.flow.table`), and
    a fifth output is the tables' largest measured relative error.

    With ``same`` inputs the diagonal is the single-input recursion: its layer-1 entries are the
    variances themselves (one sum, not a second one inside the matrix product) and on every
    layer its maps are :func:`diag_maps`, written over the pair maps' diagonal, so that
    ``K_aa``, ``Theta_aa`` are exactly what the scalar recursion gives.

    With ``last`` only the output layer is returned (a layer axis of length 1): the layers
    below stay in the scan's packed carry, never unpacked into full kernels nor written."""
    n0 = x1.shape[1]
    layout = _Layout.of(x1.shape[0], x2.shape[0], same=same)
    if same and not last:
        # every layer written in full: the whole kernel as one symmetric block (every entry
        # computed, nothing mirrored) took 218 ms against 274 ms with the triangle of blocks
        # mirrored per layer (relu, N = 2000, depth 10, float32; gelu 241 against 264 ms)
        layout = _Layout(x1.shape[0], x1.shape[0], 1, symmetric=True)
    lam_b = jnp.asarray(rec.lambda_b, x1.dtype)
    lam_w = jnp.asarray(rec.lambda_w, x1.dtype)
    d1 = jnp.sum(x1 * x1, axis=1) / n0
    d2 = d1 if same else jnp.sum(x2 * x2, axis=1) / n0
    if same:
        dot = layout.pack(x1 @ x1.T / n0)
        dot = layout.on_diagonal(dot, d1)
    else:
        dot = (x1 @ x2.T / n0)[None]
    k11 = _next_nngp(rec, d1)
    k22 = k11 if same else _next_nngp(rec, d2)
    # K and Theta as the real and imaginary parts of one complex array: XLA computes both in
    # one loop over the entries and shares their maps (two real outputs take two loops, or
    # one loop, stacked, that computes the maps once for each)
    first = (jax.lax.complex(_next_nngp(rec, dot), lam_b[0] + lam_w[0] * dot), k11, k22)
    n_layers = lam_b.shape[0]

    def layer(carry, lam):
        kt, k11, k22 = carry
        new, err = _layer(rec, layout, (jnp.real(kt), jnp.imag(kt), k11, k22), lam, **kw)
        return (jax.lax.complex(new[0], new[1]), new[2], new[3]), err

    def step(carry, xs):
        # emit layer l (the full kernels: the result is written once) and compute layer
        # l + 1 from it, except after the last layer
        l, lam = xs
        full = layout.unpack(carry[0])
        out = (jnp.real(full), jnp.imag(full), carry[1], carry[2])
        last = lambda c, _: (c, jnp.zeros((), x1.dtype))  # noqa: E731
        carry, err = jax.lax.cond(l + 1 < n_layers, layer, last, carry, lam)
        return carry, (out, err)

    kw = dict(order=order, rule=rule, tabulate=tabulate)
    if last:
        # the output layer only: the layers below stay in the packed carry, never unpacked or
        # written (a layer axis of length 1)
        steps = (lam_b[1:], lam_w[1:]) + _residual_inputs(rec, x1.dtype)
        (kt, k11, k22), errs = jax.lax.scan(layer, first, steps)
        full = layout.unpack(kt)
        out = (jnp.real(full)[None], jnp.imag(full)[None], k11[None])
        out = out + ((k11 if same else k22)[None],)
        return out + (jnp.max(errs, initial=0.0),) if tabulate else out
    zero = jnp.zeros(1, x1.dtype)  # the scalings "after" the last layer: not used
    lams = (jnp.concatenate([lam_b[1:], zero]), jnp.concatenate([lam_w[1:], zero]))
    lams = lams + tuple(jnp.concatenate([v, zero]) for v in _residual_inputs(rec, x1.dtype))
    _, ((k12s, thetas, k11s, k22s), errs) = jax.lax.scan(step, first, (jnp.arange(n_layers), lams))
    if same:
        k22s = k11s
    if tabulate:
        return k12s, thetas, k11s, k22s, jnp.max(errs, initial=0.0)
    return k12s, thetas, k11s, k22s


@partial(jax.jit, static_argnames=("order", "rule"))
def _probe_flow(rec: Recursion, k11, k22, k12, theta, kd, thetad, *, order: int, rule: str):
    """The recursion of :func:`_native` on single kernel entries, at ``order`` and ``2 order``.

    ``k11, k22, k12, theta`` are ``[P]`` layer-1 values of ``P`` off-diagonal entries and
    ``kd, thetad`` ``[D]`` layer-1 values of ``D`` diagonal entries (the same input twice). An
    entry's recursion depends on its own layer-1 values only, so these are the entries
    :func:`_native` gives (the pair maps for the former, :func:`diag_maps` for the latter):
    the same :func:`_layer`, on entries that carry their own variances.

    Returns:
      ``((k12, theta), (kd, thetad))`` at ``order`` and the same at ``2 order``: ``[L+1, P]``
      and ``[L+1, D]`` arrays.
    """
    lams = (jnp.asarray(rec.lambda_b[1:], k12.dtype), jnp.asarray(rec.lambda_w[1:], k12.dtype))
    entrywise = _Layout(k12.shape[0], k12.shape[0], entrywise=True)
    lams = lams + _residual_inputs(rec, k12.dtype)

    def stacked(first, rest):
        return tuple(jnp.concatenate([a[None], b]) for a, b in zip(first, rest, strict=True))

    def flows(o):
        kw = dict(order=o, rule=rule, tabulate=False)

        def pair_layer(carry, lam):
            new = _layer(rec, entrywise, carry, lam, **kw)[0]
            return new, new

        def diag_layer(carry, lam):
            k, theta = carry
            f, df = diag_maps(rec, k, order=o, rule=rule)
            new = (_next_nngp(rec, f), _next_ntk(rec, lam, f, df, theta))
            if rec.shortcut is not None:
                new = _residual_update(new, carry, lam[2:])
            return new, new

        first = (k12, theta, k11, k22)
        pairs = stacked(first, jax.lax.scan(pair_layer, first, lams)[1])
        diag = stacked((kd, thetad), jax.lax.scan(diag_layer, (kd, thetad), lams)[1])
        return (pairs[0], pairs[1]), diag

    return flows(order), flows(2 * order)


def _neural_tangents(arch: MLP, x1, x2, *, order: int):
    """All layers in one pass: ``Dense, FanOut(2), parallel(Identity, rest)`` at every layer,
    so the kernel function returns the nested tuple ``(K1, (K2, (..., K_{L+1})))``."""
    from rgnn._compat import import_neural_tangents

    stax = import_neural_tangents().stax
    layers = arch.stax_layers(quadrature_order=order)
    net = layers[-1]
    if arch.is_residual:  # one stage per preactivation layer
        for stage in layers[-2::-1]:
            net = stax.serial(stage, stax.FanOut(2), stax.parallel(stax.Identity(), net))
    else:
        for i in range(len(layers) - 3, -1, -2):  # Dense layers below the output, top down
            dense, act = layers[i], layers[i + 1]
            net = stax.serial(
                dense, stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(act, net))
            )
    with warnings.catch_warnings():
        # the shortcut z^(l) and the branch W sigma(z^(l)) of a residual block are independent
        # at infinite width (W has mean zero), which is what FanInSum assumes
        warnings.filterwarnings("ignore", "`FanIn` layers assume independent", UserWarning)
        out, kernels = net[2](x1, x2, None), []
    while isinstance(out, tuple | list):
        kernels.append(out[0])
        out = out[1]
    kernels.append(out)
    nngp = jnp.stack([k.nngp for k in kernels])
    ntk = jnp.stack([k.ntk for k in kernels])
    d1 = jnp.stack([k.cov1 for k in kernels])
    d2 = d1 if x2 is None else jnp.stack([k.cov2 for k in kernels])
    return nngp, ntk, d1, d2


MEMORY_LIMIT = 8 * 2**30
"""Default ``memory_limit`` of :func:`fixed_point`, in bytes (8 GiB)."""

QUADRATURE_RTOL = {jnp.dtype("float64"): 1e-6, jnp.dtype("float32"): 1e-4}
"""Default ``rtol`` of :func:`fixed_point`, by the dtype of the kernels."""

_PROBE_PAIRS = 128
"""Off-diagonal kernel entries, spread over the correlations, that the error estimate probes."""

_PROBE_DIAGONAL = 256
"""Inputs, spread over the norms, whose diagonal entries the error estimate probes."""

_PROBE_GRID = (64, 512)
"""Correlations on the coarse and the refined uniform grid over the layer-1 range, at each
pair of extreme norms."""

_PROBE_SIZE = 512
"""A kernel with at most this many entries has every entry probed; a larger one is sampled
(at most ``_PROBE_PAIRS + 8 + 4 * 64`` off-diagonal and ``2 * _PROBE_DIAGONAL`` diagonal
entries, which fit this size)."""

_PROBE_MIN = 16
"""Probed entries of each kind are padded to the next power of 2, at least this many: a few
sizes, each compiled once, and a small kernel's probe does not pay for the largest one (a
depth-6 softplus kernel on 4 x 3 inputs at 192 nodes: 8.4 s for its estimate when padded to
512, 0.1 s at 16)."""

_SAFETY = 3.0
"""``|E_n - E_2n|`` times 2 bounds ``|E_n - E|`` for a rule converging like ``1/n`` or faster
(kinks: the NTK's step-function derivative converges like ``1/n``, the NNGP like ``1/n^2``),
and the difference is the error itself for exponential convergence; the further factor 1.5
is room for the erratic constant of a kink's error (its ratio to ``|E_n - E_2n|`` measured
up to 2.1 on single entries)."""


def _memory_bytes(n1: int, n2: int, n_layers: int, n0: int, itemsize: int, order: int) -> int:
    """Peak memory of :func:`_native` on ``[n1, n0]`` and ``[n2, n0]`` inputs, in bytes.

    The outputs are ``2 (L+1)`` kernel-sized arrays, written once; the layer being computed
    (every entry, as one block, when all layers are written), its maps' temporaries and the
    complex carry about 11 more; a quadrature whose inner sum is vectorized
    (``entries * order <= 2^24``, :func:`rgnn.gaussian.expect_pairs`) holds ``3 order`` more
    per entry. Checked on XLA's own memory analysis of the compiled function (depth 10,
    float32): 1.04 times its peak for tanh on 1000 inputs, 1.2 for relu on 2000 and gelu on
    512 (earlier calibration of the triangle-of-blocks layout: 1.09 to 1.70, depths 2 to 30).
    """
    entries = n1 * n2
    quad = 3 * order * entries if 0 < entries * order <= 2**24 else 0
    return itemsize * (entries * (2 * n_layers + 11) + quad + (n1 + n2) * (n0 + 4 * n_layers))


def _check_memory(arch: MLP, x1, x2, order: int, memory_limit, n_out: int | None = None) -> None:
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    n_out = arch.n_layers if n_out is None else n_out  # layers written to the result
    need = _memory_bytes(x1.shape[0], n2, n_out, x1.shape[1], jnp.dtype(x1.dtype).itemsize, order)
    if need > memory_limit:
        names = "x1" if x2 is None else "x1, x2"
        raise ValueError(
            f"{names}: {x1.shape[0]} x {n2} inputs over {arch.n_layers} layers need about "
            f"{need / 2**30:.3g} GiB for the kernels (memory_limit = {memory_limit / 2**30:.3g} "
            "GiB); pass fewer inputs, compute the kernel in tiles "
            "(rgnn.sharding.tiled_fixed_point), or raise memory_limit"
        )


def _spread(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` of ``values``, evenly spaced in their sorted order (the
    smallest and largest included)."""
    order = np.argsort(values, kind="stable")
    if order.size > count:
        order = order[np.round(np.linspace(0, order.size - 1, count)).astype(int)]
    return order


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` (1-D) padded to ``size`` with its first element (one compilation per size)."""
    return np.concatenate([a, np.broadcast_to(a[:1], (size - a.shape[0],))])


def _relative(diff, scale) -> float:
    """The largest ``[L+1, M]`` difference of each layer over that layer's ``scale``, over all
    layers (``0.0`` without entries)."""
    if diff.size == 0:
        return 0.0
    return float(np.max(np.max(diff, axis=1) / np.maximum(scale, np.finfo(np.float64).tiny)))


class _Estimate:
    """The quadrature-error estimate of :func:`fixed_point` (see :class:`FixedPoint`)."""

    def __init__(self, rec: Recursion, fp: FixedPoint, *, order: int, rule: str, same: bool):
        self.rec, self.order, self.rule, self.same = rec, order, rule, same
        self.dtype = fp.nngp.dtype
        self.k, self.t = np.asarray(fp.nngp, np.float64), np.asarray(fp.ntk, np.float64)
        self.d1 = np.asarray(fp.nngp_diag1, np.float64)
        self.d2 = np.asarray(fp.nngp_diag2, np.float64)
        self.scale_k = np.maximum(
            np.max(np.abs(self.k), axis=(1, 2)),
            np.maximum(np.max(self.d1, axis=1), np.max(self.d2, axis=1)),
        )
        self.scale_t = np.max(np.abs(self.t), axis=(1, 2))

    def every_entry(self) -> float:
        """The estimate on every entry of a small kernel (no sampling, no grid)."""
        k, t, d1, d2 = self.k[0], self.t[0], self.d1[0], self.d2[0]
        rows, cols = np.nonzero(~np.eye(*k.shape, dtype=bool) if self.same else np.ones(k.shape))
        pairs = [d1[rows], d2[cols], k[rows, cols], t[rows, cols]]
        if self.same:
            return self.run(pairs, [d1, np.diagonal(t), np.ones(d1.size, bool)])
        both = np.concatenate([d1, d2])
        return self.run(pairs, [both, both, np.zeros(both.size, bool)])

    def run(self, pairs, diag=None) -> float:
        """``_SAFETY`` times the largest relative ``|E_n - E_2n|`` over the probes: ``pairs`` the
        layer-1 ``(k11, k22, k12, theta)`` of off-diagonal entries, ``diag`` ``(k, theta,
        ntk_known)`` of diagonal entries (whose NTK is compared where ``ntk_known``)."""
        if diag is None:  # a dummy diagonal entry, not compared
            diag, d = [pairs[0][:1], pairs[3][:1], np.zeros(1, bool)], 0
        else:
            d = diag[0].size
        p = pairs[0].size
        if not p:  # nothing off the diagonal: a dummy pair, not compared
            pairs = [diag[0][:1]] * 3 + [diag[1][:1]]
        # powers of 2 (the sampled stages fit _PROBE_SIZE): a few compilations for any N
        size_p, size_d = (max(_PROBE_MIN, 1 << (max(n, 1) - 1).bit_length()) for n in (p, d))
        args = [_padded(a, size_p) for a in pairs] + [_padded(a, size_d) for a in diag[:2]]
        args = [jnp.asarray(a, self.dtype) for a in args]
        lo, hi = _probe_flow(self.rec, *args, order=self.order, rule=self.rule)
        (lo_k, lo_t), (lo_kd, lo_td) = (tuple(np.asarray(a, np.float64) for a in x) for x in lo)
        (hi_k, hi_t), (hi_kd, hi_td) = (tuple(np.asarray(a, np.float64) for a in x) for x in hi)
        errs = [
            _relative(np.abs(hi_k - lo_k)[:, :p], self.scale_k),
            _relative(np.abs(hi_t - lo_t)[:, :p], self.scale_t),
            _relative(np.abs(hi_kd - lo_kd)[:, :d], self.scale_k),
            _relative(np.abs(hi_td - lo_td)[:, :d][:, diag[2][:d]], self.scale_t),
        ]
        return _SAFETY * max(errs)

    def sampled(self) -> tuple[float, list]:
        """The estimate on sampled entries and the coarse correlation grid; also the norm pairs
        and the range of correlations for :meth:`refined` (empty without off-diagonal
        entries)."""
        k, t, d1, d2 = self.k[0], self.t[0], self.d1[0], self.d2[0]
        n1, n2 = k.shape
        norm = np.sqrt(d1[:, None] * d2[None, :])
        rho = np.where(norm > 0, k / np.where(norm > 0, norm, 1.0), 0.0)
        if self.same:
            np.fill_diagonal(rho, np.nan)
        flat = rho.ravel()
        entries = np.flatnonzero(np.isfinite(flat))
        if entries.size > 16 * _PROBE_PAIRS:  # a fixed sample: no seed changes the result
            entries = np.unique(np.random.default_rng(0).choice(entries, 16 * _PROBE_PAIRS))
        picked = list(entries[_spread(flat[entries], _PROBE_PAIRS)])
        ext1, ext2 = (np.argmin(d1), np.argmax(d1)), (np.argmin(d2), np.argmax(d2))
        # norms equal to a relative 1e-6 (normalized inputs) count as one
        ext1, ext2 = (
            e[1:] if d[e[1]] <= d[e[0]] * (1 + 1e-6) else e for e, d in ((ext1, d1), (ext2, d2))
        )
        picked += [a * n2 + b for a in ext1 for b in ext2 if not (self.same and a == b)]
        if entries.size:
            picked += [np.nanargmax(flat), np.nanargmin(flat)]
        picked = np.unique(np.asarray(picked, int))
        rows, cols = picked // n2, picked % n2
        pairs = [d1[rows], d2[cols], k[rows, cols], t[rows, cols]]
        diag = [d1, np.diagonal(t) if self.same else d1, np.full(n1, self.same)]
        if not self.same:
            diag = [np.concatenate([d1, d2]), np.concatenate([d1, d2]), np.zeros(n1 + n2, bool)]
        keep = _spread(diag[0], 2 * _PROBE_DIAGONAL if not self.same else _PROBE_DIAGONAL)
        diag = [a[keep] for a in diag]
        if not entries.size:  # a single input: its diagonal only
            return self.run(pairs, diag), []
        span = (float(np.nanmin(flat)), float(np.nanmax(flat)))
        norms = sorted({(d1[a], d2[b]) for a in ext1 for b in ext2})
        grid = self._grid(norms, span, _PROBE_GRID[0])
        est = self.run([np.concatenate([a, b]) for a, b in zip(pairs, grid, strict=True)], diag)
        return est, [norms, span]

    def _grid(self, norms, span, points: int) -> list:
        """Layer-1 ``(k11, k22, k12, theta)`` of ``points`` correlations evenly spaced over
        ``span`` at each pair of ``norms``."""
        rec = self.rec
        rho = np.linspace(span[0], span[1], points)
        parts = []
        for a, b in norms:
            k12 = rho * np.sqrt(a * b)
            theta = rec.lambda_b[0] + rec.lambda_w[0] * (k12 - rec.bias_var) / rec.weight_var
            parts.append((np.full(points, a), np.full(points, b), k12, theta))
        return [np.concatenate(a) for a in zip(*parts, strict=True)]

    def refined(self, norms, span) -> float:
        """The estimate on the refined correlation grid."""
        return self.run(self._grid(norms, span, _PROBE_GRID[1]))


def _estimate_quadrature_error(
    rec: Recursion, fp: FixedPoint, *, order: int, rule: str, same: bool, rtol: float
) -> float:
    """The estimated ``quadrature_error`` of ``fp`` (:class:`FixedPoint`): the largest
    ``_SAFETY |E_n - E_2n|`` relative to the largest entry of the same layer and kernel, with
    ``E_n`` the kernels at ``order`` nodes (the result's rule) and ``E_2n`` at ``2 order``.

    On a kernel with at most ``_PROBE_SIZE`` entries every entry is recomputed
    (:meth:`_Estimate.every_entry`).
    Otherwise (:meth:`_Estimate.sampled`, :func:`_probe_flow`): up to ``_PROBE_PAIRS``
    off-diagonal entries spread evenly over the quantiles of the layer-1 correlation, its
    extremes and the pairs of extreme norms; the diagonal entries of up to ``_PROBE_DIAGONAL``
    inputs spread over the quantiles of their norm; and a grid of correlations over the
    layer-1 range at each pair of extreme norms, which need not be entries of the result. A
    kink's error varies erratically with the correlation (for relu it peaks sharply at
    ``rho = +-1/sqrt(2)``, where the kink's line runs along the diagonals of the product
    grid): 128 sampled entries can miss that peak by a factor of several, a uniform grid of
    512 correlations finds it to 0.2%. The grid has 64 points, refined to 512 when the
    estimate is within a factor 100 of ``rtol``.
    """
    est = _Estimate(rec, fp, order=order, rule=rule, same=same)
    n1, n2 = est.k.shape[1:]
    if n1 * n2 <= _PROBE_SIZE:  # every entry fits the probes' arrays
        return est.every_entry()
    err, refine = est.sampled()
    if refine and err > rtol / 100:
        err = max(err, est.refined(*refine))
    return err


def fixed_point(
    arch: MLP,
    x1,
    x2=None,
    *,
    backend: str = "native",
    quadrature_order: int = 96,
    quadrature_rule: str = "trapezoid",
    rtol: float | None = None,
    memory_limit: float = MEMORY_LIMIT,
    layers: str = "all",
) -> FixedPoint:
    """Per-layer infinite-width NNGP and NTK of ``arch`` on ``x1`` (and ``x2``).

    Args:
      arch: the :class:`~rgnn.MLP`; or a neural-tangents stax triple, a flax nnx module or a
        :class:`rgnn.models.Model` (:func:`rgnn.models.model_fixed_point`): then only the
        output layer exists, on a layer axis of length 1 (``fp.nngp[-1]``), from the model's
        own kernels (``kernel_fn`` for a triple); a kernel the model lacks is NaN, and
        ``backend`` is ``"model"``.
      x1: ``[N1, n_0]`` inputs.
      x2: ``[N2, n_0]`` inputs, or ``None`` for ``x2 = x1``.
      backend: ``"native"`` (rgnn's jitted recursion) or ``"neural_tangents"``.
      quadrature_order: nodes per dimension for activations without a closed form (the cost
        is ``order**2`` per kernel entry and layer).
      quadrature_rule: ``"trapezoid"`` (default; exponentially convergent for analytic
        activations, see :mod:`rgnn.gaussian`) or ``"hermite"``, for the native backend. The
        ``neural_tangents`` backend always uses its own Gauss-Hermite rule
        (``stax.ElementwiseNumerical(deg=quadrature_order)``), which converges more slowly:
        give it a higher order for the same accuracy.
      rtol: the accuracy asked of the quadrature: a ``UserWarning`` names the activation when
        the estimated ``quadrature_error`` of the result (see :class:`FixedPoint`) exceeds it
        (an activation with a kink, written as a callable, is off by about 1% at the default
        order: use the built-in one). ``None`` (default): ``1e-6`` for float64 kernels,
        ``1e-4`` for float32; ``math.inf`` skips the estimate (``quadrature_error`` is then
        ``None``). The estimate recomputes some entries at twice the order: measured for tanh
        at depth 10, 1% of the time of the kernels at ``N = 256``, 8% at 128, 31% at 64, and
        about 0.3 s (plus one compilation) on smaller kernels.
      memory_limit: the most memory, in bytes, the computation may need (default
        ``MEMORY_LIMIT``, 8 GiB); a larger request raises a ``ValueError`` before anything is
        allocated. The need is estimated as the native backend's peak, about
        ``itemsize * N1 * N2 * (2 (L+1) + 8)`` bytes plus, for quadrature on fewer than
        ``2^24 / order`` entries, ``3 order`` more per entry (the ``neural_tangents`` backend's
        own peak is not modelled).
      layers: ``"all"`` (default: every layer, ``[L+1, ...]``) or ``"output"``: the output
        layer alone, on a layer axis of length 1 (``fp.nngp[0]`` is ``K^{(L+1)}``; the native
        backend then never forms the lower layers' full kernels, which is most of the time and
        memory of a large kernel). Its ``quadrature_error`` (quadrature activations) is
        estimated on the kernels of all layers on up to 64 of the inputs.

    Returns:
      A :class:`FixedPoint` with ``nngp`` and ``ntk`` of shape ``[L+1, N1, N2]``
      (``[1, N1, N2]`` with ``layers="output"``). The dtype
      follows the inputs (float64 inputs under ``jax.enable_x64`` give float64 kernels).

    Raises:
      ValueError: for bad arguments, and when the computation would need more than
        ``memory_limit`` bytes.

    Example:
      >>> import numpy as np, rgnn
      >>> fp = rgnn.fixed_point(rgnn.MLP(3, 512, "relu", weight_var=2.0), np.eye(4))
      >>> fp.nngp.shape
      (4, 4, 4)
    """
    if not isinstance(arch, MLP):
        from rgnn.models import model_fixed_point

        return model_fixed_point(arch, x1, x2)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if isinstance(quadrature_order, bool) or not isinstance(quadrature_order, int):
        raise ValueError(f"quadrature_order: expected an integer >= 1, got {quadrature_order!r}")
    if quadrature_order < 1:
        raise ValueError(f"quadrature_order: expected an integer >= 1, got {quadrature_order!r}")
    from rgnn.gaussian import RULES

    if quadrature_rule not in RULES:
        raise ValueError(f"quadrature_rule: expected one of {RULES}, got {quadrature_rule!r}")
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, int | float) or not rtol > 0
    ):
        raise ValueError(f"rtol: expected a number > 0 or None, got {rtol!r}")
    if (
        isinstance(memory_limit, bool)
        or not isinstance(memory_limit, int | float)
        or not memory_limit > 0
    ):
        raise ValueError(f"memory_limit: expected a number of bytes > 0, got {memory_limit!r}")
    if layers not in ("all", "output"):
        raise ValueError(f"layers: expected 'all' or 'output', got {layers!r}")
    last = layers == "output"
    x1, x2 = check_pair(x1, x2)
    order = 0 if arch.act.closed_form else quadrature_order
    _check_memory(arch, x1, x2, order, memory_limit, n_out=1 if last else None)
    rec = arch.recursion(x1.shape[1])  # raises for muP
    same = x2 is None
    if backend == "native":
        nngp, ntk, d1, d2 = _native(
            rec, x1, x1 if same else x2, order=order, rule=quadrature_rule, same=same, last=last
        )
    else:
        nngp, ntk, d1, d2 = _neural_tangents(arch, x1, x2, order=quadrature_order)
        if last:
            nngp, ntk, d1, d2 = (a[-1:] for a in (nngp, ntk, d1, d2))
    fp = FixedPoint(nngp, ntk, d1, d2, backend=backend, quadrature_order=order)
    if not order:
        return fp
    if isinstance(nngp, jax.core.Tracer):  # under jit or vmap: no concrete values to probe
        return dataclasses.replace(fp, quadrature_error=None)
    rtol = QUADRATURE_RTOL.get(jnp.dtype(nngp.dtype), 1e-6) if rtol is None else rtol
    if rtol == float("inf"):  # any error is accepted: nothing to estimate
        return dataclasses.replace(fp, quadrature_error=None)
    rule = quadrature_rule if backend == "native" else "hermite"
    probe = fp
    if last:  # the estimate needs every layer: on a subset of the inputs
        sub1, sub2 = x1[:64], None if same else x2[:64]
        probe = fixed_point(
            arch,
            sub1,
            sub2,
            backend=backend,
            quadrature_order=quadrature_order,
            quadrature_rule=quadrature_rule,
            rtol=math.inf,
        )
    err = _estimate_quadrature_error(rec, probe, order=order, rule=rule, same=same, rtol=rtol)
    if err > rtol:
        warnings.warn(
            f"fixed_point: the quadrature of activation {arch.act.name!r} with "
            f"quadrature_order={order} has an estimated error of {err:.2g} relative to each "
            f"layer's largest kernel entry, above rtol={rtol:g}: raise quadrature_order, or, "
            "for an activation with a kink (whose quadrature converges only like 1/order), "
            "use a built-in activation with a closed form (relu, rgnn.leaky_relu(a), linear, "
            "erf, gelu, sin)",
            UserWarning,
            stacklevel=2,
        )
    return dataclasses.replace(fp, quadrature_error=err)


def _fixed_point_tabulated(arch: MLP, x, *, quadrature_order: int) -> tuple[FixedPoint, float]:
    """:func:`fixed_point` of ``x`` with itself (native backend, trapezoid rule) and the
    off-diagonal maps of one-norm layers from the correlation table of
    :mod:`rgnn.flow.table` when that is cheaper; also returns the tables' largest measured
    relative error (``0.0`` without tables). For :func:`rgnn.perturbative`, which checks its
    own memory and estimates its own quadrature error: here neither is done (the result's
    ``quadrature_error`` is ``None``, not estimated, for quadrature activations)."""
    x, _ = check_pair(x, None)
    n = x.shape[0]
    rec = arch.recursion(x.shape[1])
    order = 0 if arch.act.closed_form else quadrature_order
    tabulate = bool(order) and flow_table.worth_it(n * n // 2)
    out = _native(rec, x, x, order=order, rule="trapezoid", same=True, tabulate=tabulate)
    nngp, ntk, d1, d2 = out[:4]
    fp = FixedPoint(
        nngp,
        ntk,
        d1,
        d2,
        backend="native",
        quadrature_order=order,
        quadrature_error=None if order else 0.0,
    )
    return fp, float(out[4]) if tabulate else 0.0
