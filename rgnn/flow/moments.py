"""One Gaussian-moment engine: expectations of products of ``sigma^(k)`` on a set of inputs.

Every statistic of the flow needs Gaussian expectations under the layer's kernel ``K`` of
products of the activation and its derivatives, each factor on one input of the set:

.. math::

    \\langle \\sigma^{(k_1)}(z_{a_1}) \\cdots \\sigma^{(k_n)}(z_{a_n}) \\rangle_K,
    \\qquad n \\in \\{2, 4\\},

as a tensor over all index tuples ``(a_1, ..., a_n)`` of the set (``[m]^n``). An entry depends
only on the *distinct* inputs among its indices, so the engine evaluates each distinct
sub-multiset once and gathers (index tables built in NumPy at trace time, no loops over
entries):

* one input: a one-dimensional rule (``order_single`` nodes), or closed forms for the
  scale-invariant class (``E |z|^p`` with the step's two slopes; ``sigma'' = (1 - a) delta``);
* two inputs: the two-dimensional rule of :mod:`rgnn.gaussian` (Cholesky factor, ``order``
  nodes per dimension), or the exact polar integrals of the scale-invariant class (radial part
  in closed form, angular part as a closed-form half circle minus the shorter arc between the
  kinks by Gauss-Legendre; :meth:`Moments._power_form`), a delta factor integrated against
  the conditional Gaussian;
* three and four inputs: a tensor-product rule in the Cholesky coordinates (Gauss-Hermite; for
  tanh, whose poles at ``+-i pi/2`` slow Gauss-Hermite down, a Gaussian-weighted trapezoid rule
  passed in by :mod:`rgnn.perturbative`), contracted one variable at a time (``z_4`` depends on
  all four nodes, ``z_1`` on one), for a basis of factors at once, so its cost is
  ``order_multi^4`` per 4-set, not per statistic. Its error is estimated against a rule with
  fewer nodes (:meth:`Moments.multi_error`).

Derivative moments ``D_c(f(z_a) g(z_b)) = <d_c (f_a g_b)>`` come from the derivative of the
factor (smooth activations) or from Gaussian integration by parts, ``<d_c F> = sum_u
(K^{-1})_{cu} <z_u F>`` on the two inputs (scale-invariant class: the distributional
derivative without delta functions). The Price-identity operators (``d<f_a g_b> / dK_ef``)
use the same moments, and for activations with closed-form kernel maps their derivatives by
automatic differentiation (exact for relu; the diagonal of a scale-invariant map is linear).

Kinks: ``pointwise`` drops ``sigma''`` of relu-like activations (what autodiff of a network
gives); otherwise ``sigma'' sigma'^j = (1 - a^(j+1)) / (j+1) delta`` (the distributional
derivative, the limit of smooth activations). ``sigma'''`` of a kinked activation exists only
pointwise (zero).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.jet import jet

from rgnn import gaussian
from rgnn._arctan import arctan2
from rgnn.flow.tensor import L, extract, sum_last, take

KINKS = ("distributional", "pointwise")
"""How the second derivative of a kinked activation (relu, leaky relu) is taken."""

MAX_DERIVATIVE = 5
"""Highest derivative of ``sigma`` on the quadrature grids (the NTK's Price Hessian needs the
fifth)."""


ARC_NODES = {2: 8, 4: 10, 6: 12, 8: 14}
"""Gauss-Legendre nodes on the short arc of the exact polar integrals (:func:`_arc_integrals`),
by the total degree of the product (up to): the integrand ``sin^p x sin^q(alpha - x)`` on
``[0, alpha]``, ``alpha <= pi / 2``, is then integrated to a relative error below ``1e-14``
(measured against 60 nodes over ``p + q`` at that degree and 100 angles from ``1e-3`` to
``pi / 2``; one node fewer per two degrees is ``1e-10``). The statistics of the pair layout
need degree 4 at most."""


def _slope(act) -> float:
    return 1.0 if act.negative_slope is None else float(act.negative_slope)


def _arc_coefficients(p: int, q: int):
    """``(c_k)``, ``k = 0..q``: the half-circle integral ``J_pq(theta) = int_{-pi/2}^{pi/2}
    cos^p t cos^q(t - theta) dt = sum_k c_k cos^k(theta) sin^(q-k)(theta)`` (expand
    ``cos(t - theta)``; the odd powers of ``sin t`` vanish, the others are Beta functions)."""
    out = []
    for k in range(q + 1):
        if (q - k) % 2:
            out.append(0.0)
            continue
        a, b = (p + k + 1) / 2, (q - k + 1) / 2
        beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
        out.append(math.comb(q, k) * beta)
    return out


def _derivatives(fn, order: int):
    """``[sigma, sigma', ..., sigma^(order)]`` as elementwise functions (autodiff)."""
    out = [fn]
    for _ in range(order):
        f = out[-1]
        out.append(jnp.vectorize(jax.grad(lambda x, f=f: f(x))))
    return out


def _abs_moment(p):
    """``E|xi|^p`` for ``xi ~ N(0, 1)`` (vectorised over a NumPy array ``p``)."""
    p = np.asarray(p, float)
    return 2 ** (p / 2) * np.exp(np.vectorize(math.lgamma)((p + 1) / 2)) / math.sqrt(math.pi)


# ----------------------------------------------------------------------------- index tables
@functools.cache
def _patterns(n: int, d: int):
    """Assignments of ``n`` slots to ``d`` distinct variables using every variable, as an int
    array ``[P, n]`` (variable ``j`` is the ``j``-th smallest input)."""
    out = [p for p in itertools.product(range(d), repeat=n) if len(set(p)) == d]
    return np.array(out, np.int32).reshape(-1, n)


@functools.cache
def _layout(m: int, n: int):
    """Where each entry of the ``[m]^n`` tensor lives in the concatenation of the tables of
    distinct sub-multisets: ``(subsets, index)`` with ``subsets[d]`` the sorted ``d``-subsets
    of ``range(m)`` (``[S_d, d]``) and ``index`` ``[m^n]`` into
    ``concat([T_d.ravel() for d])``, ``T_d`` of shape ``[S_d, P_d]`` (``P_d`` patterns)."""
    subsets = {
        d: np.array(list(itertools.combinations(range(m), d)), np.int32).reshape(-1, d)
        for d in range(1, min(m, n) + 1)
    }
    offsets, off = {}, 0
    pos = {}
    for d, sub in subsets.items():
        offsets[d] = off
        pos[d] = {tuple(s): i for i, s in enumerate(sub)}
        off += len(sub) * len(_patterns(n, d))
    # every index tuple at once (a loop over the m^n tuples took 0.2 s at m = 16, n = 4):
    # its distinct values in order, their count d, each slot's rank among them (the
    # pattern), and the lexicographic positions of the subset and the pattern, found by
    # searching their base-m / base-d codes in the (lexicographically sorted) lists
    t = np.indices((m,) * n).reshape(n, -1).T  # [m^n, n], row-major order
    srt = np.sort(t, axis=1)
    new = np.ones_like(srt, dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    dist = new.sum(axis=1)
    pat = (new[:, None, :] & (srt[:, None, :] < t[:, :, None])).sum(axis=2)  # [m^n, n]
    index = np.empty(m**n, np.int64)
    for d, sub in subsets.items():
        rows = np.flatnonzero(dist == d)
        vals = srt[rows][new[rows]].reshape(-1, d)
        weights_m = m ** np.arange(d - 1, -1, -1)
        sub_pos = np.searchsorted(sub.astype(np.int64) @ weights_m, vals @ weights_m)
        pats = _patterns(n, d).astype(np.int64)
        weights_d = d ** np.arange(n - 1, -1, -1)
        pat_pos = np.searchsorted(pats @ weights_d, pat[rows] @ weights_d)
        index[rows] = offsets[d] + sub_pos * len(pats) + pat_pos
    index = index.astype(np.int32)
    return subsets, index


@functools.cache
def _pair_combos(specs):
    """The distinct ``(A, B)`` factor products on the two inputs of a pair over every
    pattern of every spec (``A`` on the first input, ``B`` on the second), in order."""
    combos = {}
    for sp in specs:
        for pat in _patterns(len(sp), 2):
            ka = tuple(sorted(sp[i] for i in range(len(sp)) if pat[i] == 0))
            kb = tuple(sorted(sp[i] for i in range(len(sp)) if pat[i] == 1))
            combos.setdefault((ka, kb), None)
    return tuple(combos)


@functools.cache
def _flat_layout(specs, singles, m):
    """``(keys1, layout)`` of :meth:`Moments.flat_values`: the one-input products, and for
    every spec the rows of its two-input patterns in the table of :func:`_pair_combos`."""
    keys1 = tuple(dict.fromkeys(tuple(sorted(sp)) for sp in specs + singles))
    if m < 2:
        return keys1, ()
    pos = {c: i for i, c in enumerate(_pair_combos(specs))}
    layout = []
    for sp in specs:
        rows = []
        for pat in _patterns(len(sp), 2):
            ka = tuple(sorted(sp[i] for i in range(len(sp)) if pat[i] == 0))
            kb = tuple(sorted(sp[i] for i in range(len(sp)) if pat[i] == 1))
            rows.append(pos[(ka, kb)])
        layout.append((sp, np.array(rows, np.int32)))
    return keys1, tuple(layout)


def _cholesky(k):
    """Lower Cholesky factor of a small PSD matrix, clamped so that a (near-)singular matrix
    gives a zero column instead of NaN."""
    d = k.shape[0]
    rows = []
    for i in range(d):
        row = []
        for j in range(i + 1):
            if i == j:
                s = k[i, i] - sum(row[t] * row[t] for t in range(i))
                row.append(jnp.sqrt(jnp.maximum(s, 0.0)))
            else:
                s = k[i, j] - sum(row[t] * rows[j][t] for t in range(j))
                dj = rows[j][j]
                row.append(jnp.where(dj > 0, s / jnp.where(dj > 0, dj, 1.0), 0.0))
        rows.append(row)
    z = jnp.zeros((), k.dtype)
    return jnp.stack([jnp.stack(r + [z] * (d - len(r))) for r in rows])


# ----------------------------------------------------------------------------- the engine
class Moments:
    """Gaussian moments on one set of ``m`` inputs with kernel ``k [m, m]`` (traced).

    Args:
      act: the :class:`~rgnn.activations.Activation`.
      k: ``[m, m]`` the layer's kernel on the set.
      rules: the quadrature rules as arrays (:func:`rules`): nodes and weights for a standard
        normal variable, ``"1"`` for one input, ``"2"`` per dimension for two, ``"4"`` and
        ``"4lo"`` (fewer nodes, for the error estimate) per dimension for three and four.
      pointwise: drop ``sigma''`` of kinked activations (see the module docstring).
      kmax: the highest derivative of ``sigma`` any requested moment needs.
      fence: ``None``, or a traced scalar that is the same for every set of the ``vmap``
        this runs in (the layer's ``lambda_W``): every moment tensor is then materialised
        once (:func:`_barrier`) instead of being recomputed by each reader.
    """

    def __init__(
        self,
        act,
        k,
        rules,
        *,
        pointwise: bool,
        kmax: int = MAX_DERIVATIVE,
        record: bool = False,
        fence=None,
    ):
        self.act = act
        self.k = k
        self.m = k.shape[0]
        self.dtype = k.dtype
        self.rules = rules
        self.pointwise = pointwise
        self.kmax = kmax
        self.record = record
        self.fence = fence
        self.recorded: dict = {}  # spec -> None (ordered), in a recording pass
        self.recorded_singles: dict = {}
        self._pre1: dict = {}  # single-input products evaluated by prepare()
        self._pre2: dict = {}  # pair patterns evaluated by prepare()
        self._multi_err: list = []  # per three/four-input moment, its estimated error
        self.homogeneous = act.scale_invariant
        self.slope = _slope(act) if act.scale_invariant else None
        self._cache: dict = {}
        self.eye = jnp.eye(self.m, dtype=self.dtype)

    def _kd(self):
        """The variances ``K_aa`` (a gather: ``jnp.diagonal`` adds a platform switch)."""
        return extract(self.k, "aa").x

    # ------------------------------------------------------------------ public
    def e(self, spec, ix: str) -> L:
        """``<prod_s sigma^(k_s)(z_{ix[s]})>`` as a tensor labelled ``ix``; ``spec`` holds the
        derivative order of each slot (or ``(k, 1)`` for an extra factor ``z``)."""
        spec = tuple((s, 0) if isinstance(s, int) else tuple(s) for s in spec)
        if self.record:
            self.recorded[spec] = None
            return L(jnp.zeros((self.m,) * len(spec), self.dtype), ix)
        if spec not in self._cache:
            self._cache[spec] = _barrier(self._build(spec), self.fence)
        return L(self._cache[spec], ix)

    def d(self, spec, ix: str) -> L:
        """``D_c(f_a g_b) = <d_c (sigma^(k0)(z_a) sigma^(k1)(z_b))>`` labelled ``ix = c a b``."""
        k0, k1 = spec
        c, a, b = ix
        if not self.homogeneous:
            x = self.e((k0 + 1, k1), a + b)
            y = self.e((k0, k1 + 1), a + b)
        else:
            # integration by parts on the two inputs: [x; y] = K_ab^-1 [<z_a f g>; <z_b f g>];
            # on the diagonal only x + y = <z f g> / K_aa enters
            e1 = self.e(((k0, 1), (k1, 0)), "ab").x
            e2 = self.e(((k0, 0), (k1, 1)), "ab").x
            kd = self._kd()
            kaa, kbb, kab = kd[:, None], kd[None, :], self.k
            off = 1.0 - self.eye
            det = kaa * kbb - kab * kab
            det = jnp.where(off > 0, det, 1.0)
            xo = (kbb * e1 - kab * e2) / det
            yo = (-kab * e1 + kaa * e2) / det
            xd = e1 / jnp.where(off > 0, 1.0, kaa)
            x = L(off * xo + self.eye * xd, a + b)
            y = L(off * yo, a + b)
        return L(self.eye, c + a) * x + L(self.eye, c + b) * y

    def price1(self, base: int, x: L, pair: str, out: str) -> L:
        """``sum_{ef} (1/2) <d_e d_f (s_a s_b)> X_{ef...}`` (Price's identity: the first
        derivative of ``<s_a s_b>`` with respect to the kernel, contracted with ``X``) for
        ``s = sigma^(base)``; ``pair = "ef"`` are ``X``'s letters contracted, ``out = "ab"``
        the new ones, which replace them in place."""
        e, f = pair
        a, b = out
        a20, a11, a02, g1 = self._price_tables(base, 1)

        def at(u, v):  # X with e -> u, f -> v
            return extract(x.x, x.ix.replace(e, u).replace(f, v))

        off = 0.5 * (
            L(a20, a + b) * at(a, a)
            + L(a11, a + b) * (at(a, b) + at(b, a))
            + L(a02, a + b) * at(b, b)
        )
        diag = L(g1, a) * at(a, a) * L(self.eye, a + b)
        res = off * L(1.0 - self.eye, a + b) + diag
        rest = "".join(c for c in x.ix if c not in pair)
        return res.to(_replace(x.ix, pair, out) if rest else out)

    def price1_own(self, base: int, x: L) -> L:
        """``sum_{ef} (1/2) <d_e d_f (s_a s_b)> X_{ab ef}`` for ``X`` labelled ``"abef"``:
        the contraction of a tensor's last two inputs with the derivative at its first two."""
        a20, a11, a02, g1 = self._price_tables(base, 1)
        xx = x.to("abef").x
        xaa = extract(xx, "abaa").to("ab").x
        xab = extract(xx, "abab").x + extract(xx, "abba").x
        xbb = extract(xx, "abbb").x
        off = 0.5 * (a20 * xaa + a11 * xab + a02 * xbb)
        diag = g1 * extract(xx, "aaaa").x
        return L((1.0 - self.eye) * off + self.eye * diag[:, None], "ab")

    def price2(self, base: int, v: L) -> L:
        """``sum_{efgh} (1/4) <d_e d_f d_g d_h (s_a s_b)> V_{efgh}`` (the second derivative of
        ``<s_a s_b>`` contracted with ``V``), labelled ``"ab"``."""
        tabs, g2 = self._price_tables(base, 2)
        vv = v.to("efgh").x
        off = 0.0
        # the 16 ways of putting the four derivatives on a or b, grouped by how many go to b
        grids = np.indices((self.m, self.m))
        for j in range(5):
            pats = [p for p in itertools.product((0, 1), repeat=4) if sum(p) == j]
            idx = np.array([[grids[q] for q in p] for p in pats])  # [n, 4, m, m]
            terms = take(vv, tuple(idx[:, q] for q in range(4)))
            part = terms[0]
            for t in terms[1:]:  # additions, not a reduce (a YNNPACK call on XLA:CPU)
                part = part + t
            off = off + tabs[j] * part
        diag = g2 * extract(vv, "aaaa").x
        return L((1.0 - self.eye) * 0.25 * off + self.eye * diag[:, None], "ab")

    # ------------------------------------------------------------------ Price tables
    def _price_tables(self, base: int, n: int):
        """Off-diagonal ``<s^(i)_a s^(j)_b>`` (``i + j = 2n``, ``s = sigma^(base)``, ordered by
        ``j``) and the diagonal ``d^n <s(z)^2> / dK^n``."""
        key = ("price", base, n)
        if key in self._cache:
            return self._cache[key]
        if self.m == 1:  # no pairs: only the diagonal enters
            offs = [jnp.zeros_like(self.k)] * (2 * n + 1)
        elif self.homogeneous:
            offs = self._closed_form_pairs(base, n)
        else:
            offs = [self.e((base + 2 * n - j, base + j), "ab").x for j in range(2 * n + 1)]
        diag = self._single_derivative(base, n)
        out = _barrier((*offs, diag) if n == 1 else (offs, diag), self.fence)
        self._cache[key] = out
        return out

    # ------------------------------------------------------------------ batched evaluation
    def prepare(self, specs, singles=(), values=None):
        """Evaluate every one- and two-input moment of ``specs`` (and the one-input products
        ``singles``) at once, smooth activations: each distinct product of factors on one
        variable is formed once and integrated over its inner variable as it is formed (one
        fused multiply-and-add tree per product, :func:`_weighted_sum`; nothing of the size of
        the two-input grid is stored but the derivatives and the tree's first level), each
        distinct pair of products is one row of a single weighted sum, so the traced program
        does not grow with the number of statistics. (The scale-invariant class uses its
        per-pattern closed forms.)

        ``values``: the flat vector of :meth:`flat_values` for these ``specs`` (from a table,
        :mod:`rgnn.flow.table`) instead of evaluating them; the moments read afterwards are
        the same functions of it either way."""
        if self.homogeneous:
            return
        if values is None:
            values = self.flat_values(specs, singles)
        # materialised once: otherwise each moment tensor built from it recomputes the
        # table's interpolation (or the quadrature) for the entries it reads
        values = _barrier(values, self.fence)
        keys1, layout = _flat_layout(tuple(specs), tuple(singles), self.m)
        n1 = len(keys1)
        tab1 = values[: n1 * self.m].reshape(n1, self.m)
        self._pre1 = {key: tab1[i] for i, key in enumerate(keys1)}
        if self.m < 2:
            return
        n_sets = len(_layout(self.m, 2)[0][2])
        tab2 = values[n1 * self.m :].reshape(-1, n_sets)  # [U, S] unique (a, b) products
        for sp, rows in layout:
            self._pre2[sp] = take(tab2, (rows,)).T

    def flat_values(self, specs, singles=()):
        """Every one- and two-input moment :meth:`prepare` needs, as one flat vector: the
        one-input products on each input (``[n1, m]``), then each distinct two-input product
        ``<A(z_a) B(z_b)>`` on each pair of the set (``[U, S]``)."""
        keys1, layout = _flat_layout(tuple(specs), tuple(singles), self.m)
        zz, w1, fz = self._grids()["grid1"]
        tab1 = jnp.stack([_weighted_sum(self._product(fz, zz, key), w1) for key in keys1])
        if self.m < 2:
            return tab1.reshape(-1)
        u, v, w, fu, fv = self._grids()["grid2"]
        combos = _pair_combos(tuple(specs))
        keys_a = list(dict.fromkeys(a for a, _ in combos))
        keys_b = list(dict.fromkeys(b for _, b in combos))
        ua = jnp.stack([self._product(fu, u, key) for key in keys_a])  # [nA, S, Q]
        # the inner integral of each product as it is formed (fused with its additions)
        inner = jnp.stack([_weighted_sum(self._product(fv, v, key), w) for key in keys_b])
        ia = np.array([keys_a.index(a) for a, _ in combos], np.int32)
        ib = np.array([keys_b.index(b) for _, b in combos], np.int32)
        tab2 = _weighted_sum(take(ua, (ia,)) * take(inner, (ib,)), w)  # [U, S]
        return jnp.concatenate([tab1.reshape(-1), tab2.reshape(-1)])

    @staticmethod
    def _product(fvals, z, key):
        """``prod sigma^(k)(z) z^zpow`` over the factors ``(k, zpow)`` of ``key`` on the grid
        ``z`` (``1`` for no factor)."""
        out = None
        for k, zp in key:
            f = fvals[k] * z if zp else fvals[k]
            out = f if out is None else out * f
        return jnp.ones_like(z) if out is None else out

    def _closed_form_pairs(self, base: int, n: int):
        """``<s^(i)_a s^(j)_b>`` from derivatives of the closed-form map ``<s_a s_b>(K_aa,
        K_ab, K_bb)``: ``d^p_aa d^q_ab d^r_bb <s_a s_b> = 2^-(p+r) <s^(2p+q)_a s^(q+2r)_b>``."""
        act = self.act

        def phi(kk):
            f, df = act.maps(kk[0], kk[2], kk[1])
            return f if base == 0 else df

        kd = self._kd()
        kk = jnp.stack(jnp.broadcast_arrays(kd[:, None], self.k, kd[None, :]), axis=-1)
        # the diagonal's own entries are not used (replaced by the single-input derivative);
        # keep them finite
        safe = jnp.stack(
            [jnp.ones_like(self.k), 0.5 * jnp.ones_like(self.k), jnp.ones_like(self.k)], -1
        )
        kk = jnp.where((self.eye > 0)[..., None], safe, kk)
        grad = phi
        for _ in range(n):
            grad = jax.jacfwd(grad)
        g = jax.vmap(jax.vmap(grad))(kk)  # [m, m, 3, ...]
        outs = []
        for j in range(2 * n + 1):
            i = 2 * n - j
            q = min(i, j)
            p, r = (i - q) // 2, (j - q) // 2
            idx = (0,) * p + (1,) * q + (2,) * r
            outs.append(2.0 ** (p + r) * g[(Ellipsis, *idx)])
        return outs

    def _single_derivative(self, base: int, n: int):
        """``d^n/dK^n <s(z)^2>`` at each input's own variance (``s = sigma^(base)``)."""
        kd = self._kd()
        if self.homogeneous:
            a = self.slope
            a2 = (1 + a * a) / 2
            if base == 0 and n == 1:
                return jnp.full_like(kd, a2)
            return jnp.zeros_like(kd)
        # Price: d^n <F(z)> / dK^n = 2^-n <F^(2n)(z)>, with F = s^2 expanded by Leibniz
        spec_terms = []
        for j in range(2 * n + 1):
            spec_terms.append((math.comb(2 * n, j), (base + 2 * n - j, base + j)))
        tot = 0.0
        for c, sp in spec_terms:
            tot = tot + c * self._single_values(tuple((s, 0) for s in sp))
        return tot / 2.0**n

    # ------------------------------------------------------------------ building tensors
    def _build(self, spec):
        n = len(spec)
        subsets, index = _layout(self.m, n)
        parts = [self._single_values(spec, subsets[1][:, 0]).reshape(-1)]
        if 2 in subsets:
            parts.append(self._pair_values(spec, subsets[2]).reshape(-1))
        if 3 in subsets:
            parts.append(self._multi_values(spec, subsets[3], 3).reshape(-1))
        if 4 in subsets:
            parts.append(self._multi_values(spec, subsets[4], 4).reshape(-1))
        flat = jnp.concatenate(parts)
        return take(flat, (index,)).reshape((self.m,) * n)

    # one input -----------------------------------------------------------
    def _single_values(self, spec, which=None):
        """``<prod_s sigma^(k_s)(z) z^(z_s)>`` at each input's variance ``[m]`` (or at
        ``which``)."""
        kd = self._kd()
        if which is not None:
            kd = kd[np.asarray(which)]
        if self.record:
            self.recorded_singles[tuple(spec)] = None
            return jnp.zeros_like(kd)
        if self.homogeneous:
            form = self._canon(spec)
            return self._one_dim(form, kd)
        key = tuple(sorted(spec))
        if key in self._pre1:
            val = self._pre1[key]
            return val if which is None else val[np.asarray(which)]
        zz, w, fz = self._grids()["grid1"]
        val = jnp.ones_like(zz)
        for k, zp in spec:
            val = val * (fz[k] * zz if zp else fz[k])
        if which is not None:
            val = val[np.asarray(which)]
        return jnp.einsum("nq,q->n", val, w)

    def _derivs(self, z, order: int | None = None):
        """``[sigma(z), sigma'(z), ..., sigma^(order)(z)]`` (``order`` defaults to ``kmax``) by
        one Taylor-mode pass (``jet``), or by nested automatic differentiation where ``jet``
        lacks a rule. A lower ``order`` gives the same leading derivatives (a Taylor
        coefficient depends only on the lower ones) from a smaller traced program: the
        ``jet`` of gelu to the fifth order is twice the size of the one to the third."""
        order = self.kmax if order is None else order
        ones = jnp.ones_like(z)
        terms = max(order, 1)
        try:
            y0, ys = jet(self.act.fn, (z,), ((ones,) + (jnp.zeros_like(z),) * (terms - 1),))
            return [y0, *ys][: order + 1]
        except Exception:  # noqa: BLE001 - a primitive without a jet rule: autodiff instead
            return [f(z) for f in _derivatives(self.act.fn, order)]

    # scale-invariant closed forms -----------------------------------------
    def _canon(self, factors):
        """One variable's product as ``("pw", p, c_plus, c_minus)`` (``z^p`` times the
        step's slopes), ``("delta", coeff)`` or ``None`` (identically zero)."""
        a = self.slope
        n0 = sum(1 for k, _ in factors if k == 0)
        n1 = sum(1 for k, _ in factors if k == 1)
        n2 = sum(1 for k, _ in factors if k == 2)
        n3 = sum(1 for k, _ in factors if k >= 3)
        zp = sum(z for _, z in factors)
        if n2 + n3 == 0:
            return ("pw", n0 + zp, 1.0, a ** (n0 + n1))
        if self.pointwise or a == 1.0:
            return None
        if n3 or n2 > 1:
            raise ValueError(
                f"kinks: {self.act.name} has no distributional second derivative squared or "
                'third derivative; pass kinks="pointwise"'
            )
        if n0 + zp > 0:
            return None
        return ("delta", (1 - a ** (n1 + 1)) / (n1 + 1))

    @staticmethod
    def _one_dim(form, var):
        if form is None:
            return jnp.zeros_like(var)
        if form[0] == "delta":
            return form[1] / jnp.sqrt(2 * jnp.pi * var)
        _, p, cp, cm = form
        return var ** (p / 2) * float(_abs_moment(p)) * (cp + (-1) ** p * cm) / 2

    # two inputs ----------------------------------------------------------
    def _pair_values(self, spec, pairs):
        """``[S, P]``: every mixed pattern of ``spec`` on every pair of inputs."""
        pats = _patterns(len(spec), 2)
        if self.homogeneous:
            return self._pair_homogeneous(spec, pats, pairs)
        return self._pair_smooth(spec, pats, pairs)

    def _pair_kernel(self, pairs):
        kd = self._kd()
        ia, ib = pairs[:, 0], pairs[:, 1]
        kaa, kbb, kab = take(kd, (ia,)), take(kd, (ib,)), take(self.k, (ia, ib))
        s1 = jnp.sqrt(kaa)
        c = kab / s1
        s2 = jnp.sqrt(jnp.maximum(kbb - c * c, 0.0))
        return kaa, kab, kbb, s1, c, s2

    def _grids(self):
        """Every derivative of ``sigma`` on the one-input grid of every input and (smooth
        activations, two or more inputs) the two-input grid of every pair, from one
        evaluation (cached)."""
        if "grids" in self._cache:
            return self._cache["grids"]
        x1, w1 = self.rules["1"]
        zz = jnp.sqrt(self._kd())[:, None] * x1[None, :]
        pts = [zz.ravel()]
        if self.m > 1 and not self.homogeneous:
            _, _, _, s1, c, s2 = self._pair_kernel(_layout(self.m, 2)[0][2])
            x, w = self.rules["2"]
            u = s1[:, None] * x[None, :]  # [S, Q]
            v = c[:, None, None] * x[None, :, None] + s2[:, None, None] * x[None, None, :]
            pts += [u.ravel(), v.ravel()]
        # computed once and stored: without the barrier the compiler fuses the derivatives
        # into every product that reads them and evaluates them once per product
        ders = _barrier(self._derivs(jnp.concatenate(pts)), self.fence)
        sizes = np.cumsum([p.size for p in pts])[:-1]
        split = [jnp.split(dv, sizes) for dv in ders]
        out = {"grid1": (zz, w1, [sp[0].reshape(zz.shape) for sp in split])}
        if len(pts) > 1:
            out["grid2"] = (
                u,
                v,
                w,
                [sp[1].reshape(u.shape) for sp in split],
                [sp[2].reshape(v.shape) for sp in split],
            )
        self._cache["grids"] = out
        return out

    def _pair_smooth(self, spec, pats, pairs):
        if spec in self._pre2:
            return self._pre2[spec]
        u, v, w, fu, fv = self._grids()["grid2"]
        npat, (ns, q) = len(pats), u.shape
        uu = jnp.ones((npat, ns, q), self.dtype)
        vv = jnp.ones((npat, ns, q, q), self.dtype)
        for s, (k, zp) in enumerate(spec):
            on_a = jnp.asarray(pats[:, s] == 0)
            ga = fu[k] * u if zp else fu[k]
            gb = fv[k] * v if zp else fv[k]
            uu = uu * jnp.where(on_a[:, None, None], ga[None], 1.0)
            vv = vv * jnp.where(on_a[:, None, None, None], 1.0, gb[None])
        inner = jnp.einsum("psxy,y->psx", vv, w)
        return jnp.einsum("psx,psx,x->sp", uu, inner, w)

    def _polar(self, pairs):
        """Every pair's geometry for the exact polar integrals (cached): the variances, the
        Cholesky entries ``s1 = sqrt(K_aa)``, ``c = K_ab / s1``, ``s2 = sqrt(K_bb - c^2)`` and
        the short arc ``alpha = min(theta, pi - theta) = atan2(s2, |c|)``."""
        if "polar" not in self._cache:
            kaa, kab, kbb, s1, c, s2 = self._pair_kernel(pairs)
            alpha = arctan2(s2, jnp.abs(c))
            self._cache["polar"] = (kaa, kab, kbb, s1, c, s2, alpha)
        return self._cache["polar"]

    def _arc_powers(self, alpha, n: int, p: int):
        """``(w, [sin(x)^j for j <= p])`` on the ``n`` Gauss-Legendre nodes ``x`` of
        ``[0, alpha]`` of every pair (weights ``w`` include the length; cached). The nodes are
        symmetric, so ``sin(alpha - x)`` is the same array reversed."""
        key = ("arc", n)
        if key not in self._cache:
            g, gw = np.polynomial.legendre.leggauss(n)
            g = (g - g[::-1]) / 2  # exactly symmetric
            x = alpha[:, None] * jnp.asarray((1 + g) / 2, self.dtype)[None, :]
            w = alpha[:, None] * jnp.asarray(gw / 2, self.dtype)[None, :]
            self._cache[key] = (w, [jnp.ones_like(x), jnp.sin(x)])
        w, pw = self._cache[key]
        while len(pw) <= p:
            pw.append(pw[-1] * pw[1])
        return w, pw

    def _pair_homogeneous(self, spec, pats, pairs):
        geo = self._polar(pairs)
        out = []
        for pat in pats:
            fa = self._canon([spec[s] for s in range(len(spec)) if pat[s] == 0])
            fb = self._canon([spec[s] for s in range(len(spec)) if pat[s] == 1])
            key = ("form", fa, fb)  # shared by every spec of the layer
            if key not in self._cache:
                self._cache[key] = self._pair_form(fa, fb, *geo)
            out.append(self._cache[key])
        return jnp.stack(out, axis=1)

    def _power_form(self, fa, fb, s1, c, s2, alpha):
        """``<f(z_a) g(z_b)>`` for ``f = z^p (c+ [z > 0] + c- [z < 0])`` and ``g`` likewise
        (``q, d+, d-``), exactly.

        Derivation (ours). In polar coordinates of the Cholesky variables, ``z_a = r s1 cos t``
        and ``z_b = r sqrt(K_bb) cos(t - theta)``, ``cos theta = c / sqrt(K_bb)``; the radial
        integral gives ``R = 2^(n/2) Gamma(n/2 + 1)``, ``n = p + q``, and

        .. math::

            \\langle f g \\rangle = \\frac{R\\, s_1^p K_{bb}^{q/2}}{2\\pi} \\big[
              (c_+ d_+ + (-1)^n c_- d_-) I_{++} + (c_+ d_- + (-1)^n c_- d_+) I_{+-}\\big],

        ``I_{++}`` and ``I_{+-}`` the integrals of ``cos^p t cos^q(t - theta)`` over the arcs
        where ``z_a > 0`` and ``z_b`` is positive (``t`` in ``(theta - pi/2, pi/2)``) or negative
        (``(-pi/2, theta - pi/2)``); the arcs where ``z_a < 0`` are these shifted by ``pi``.
        Their sum is the half circle ``J_pq(theta)`` (:func:`_arc_coefficients`, closed form).
        The shorter arc has length ``alpha = min(theta, pi - theta)``, and substituting
        ``x = t + pi/2`` (``theta <= pi/2``) or ``x = pi/2 - t`` (``theta > pi/2``) turns its
        integral into ``S_pq(alpha) = int_0^alpha sin^p x sin^q(alpha - x) dx``:
        ``I_{+-} = (-1)^q S`` for ``theta <= pi/2``, ``I_{++} = S`` otherwise, the other one
        ``J - S``. ``S`` is integrated by Gauss-Legendre on ``[0, alpha]``
        (:data:`ARC_NODES`: a polynomial-like integrand on at most a quarter circle, to
        rounding), so it keeps its relative accuracy where it is small (nearly
        (anti)parallel pairs) and vanishes exactly at ``alpha = 0``; ``K_bb^(q/2) J`` is a
        polynomial in ``c`` and ``s2``."""
        _, p, cp, cm = fa
        _, q, dp, dm = fb
        n = p + q
        nodes = next((v for d, v in sorted(ARC_NODES.items()) if n <= d), None)
        if nodes is None:
            raise ValueError(f"internal: polar integral of degree {n} > {max(ARC_NODES)}")
        w, pw = self._arc_powers(alpha, nodes, max(p, q))
        sb2 = c * c + s2 * s2  # K_bb as the Cholesky entries give it
        sb_q = sb2 ** (q // 2) * (jnp.sqrt(sb2) if q % 2 else 1.0)
        terms = w * pw[p] * pw[q][:, ::-1]
        # summed by elementwise additions (fused), not a reduction (a library call per form)
        small = terms[:, 0]
        for i in range(1, nodes):
            small = small + terms[:, i]
        small = sb_q * small
        coef = _arc_coefficients(p, q)
        half = 0.0
        for k, ck in enumerate(coef):
            if ck:
                half = half + ck * c**k * s2 ** (q - k)
        sign_n = (-1.0) ** n
        near = c >= 0  # theta <= pi/2: the short arc is the one where z_b < 0
        i_pm = jnp.where(near, (-1.0) ** q * small, half - small)
        i_pp = jnp.where(near, half - i_pm, small)
        radial = 2 ** (n / 2) * math.gamma(n / 2 + 1) / (2 * math.pi)
        a_pp = cp * dp + sign_n * cm * dm
        a_pm = cp * dm + sign_n * cm * dp
        return radial * s1**p * (a_pp * i_pp + a_pm * i_pm)

    def _pair_form(self, fa, fb, kaa, kab, kbb, s1, c, s2, alpha):
        trivial = ("pw", 0, 1.0, 1.0)
        if fa is None or fb is None:
            return jnp.zeros_like(kaa)
        if fb == trivial:
            return self._one_dim(fa, kaa)
        if fa == trivial:
            return self._one_dim(fb, kbb)
        if fa[0] == "pw" and fb[0] == "pw":
            return self._power_form(fa, fb, s1, c, s2, alpha)
        if fa[0] == "delta" and fb[0] == "pw":
            return self._one_dim(fb, kbb - kab**2 / kaa) * fa[1] / jnp.sqrt(2 * jnp.pi * kaa)
        if fb[0] == "delta" and fa[0] == "pw":
            return self._one_dim(fa, kaa - kab**2 / kbb) * fb[1] / jnp.sqrt(2 * jnp.pi * kbb)
        raise ValueError(
            f"kinks: a second derivative of {self.act.name} on two inputs at once is a product "
            'of delta functions; pass kinks="pointwise"'
        )

    # three and four inputs --------------------------------------------------
    def _base(self):
        """The factors tabulated on three and four inputs: ``sigma^(k)`` for ``k = 0..3``
        (the scale-invariant class: ``sigma`` and ``sigma'``; its ``sigma''`` is a delta and
        is integrated separately, its ``sigma'''`` exists only pointwise)."""
        return 2 if self.homogeneous else min(4, self.kmax + 1)

    def _multi_tables(self, d: int, subsets, rule: str = "4", rows=None):
        """Basis tables on every ``d``-subset (or on the subsets ``rows`` of them): ``[S, B,
        ..., B]`` with ``B`` the number of basis products per variable (``d = 4``: one factor
        each; ``d = 3``: up to two factors on each variable, the constant included)."""
        key = ("tables", d, rule, len(subsets), None if rows is None else tuple(rows))
        if key in self._cache:
            return self._cache[key]
        nb = self._base()
        x, w = self.rules[rule]
        ckey = ("cholesky", d, len(subsets))
        if ckey not in self._cache:  # every subset's factor at once, shared by both rules
            ks = take(self.k, (subsets[:, :, None], subsets[:, None, :]))
            self._cache[ckey] = jax.vmap(_cholesky)(ks)
        chol = self._cache[ckey] if rows is None else take(self._cache[ckey], (rows,))
        if d == 3:
            # every product of at most two factors, ``one[i] * one[j]`` for ``i <= j`` in
            # row-major order, as one product of each factor with the factors after it (a
            # stack of the single products was one kernel per product and grid; a gather of
            # the pairs compiled a little faster but ran 6% slower)

            def basis(z):
                one = jnp.stack([jnp.ones_like(z)] + self._derivs(z, nb - 1))
                return jnp.concatenate([one[i : i + 1] * one[i:] for i in range(nb + 1)])
        else:

            def basis(z):
                return jnp.stack(self._derivs(z, nb - 1))

        def table(c):
            z1 = c[0, 0] * x
            z2 = c[1, 0] * x[:, None] + c[1, 1] * x[None, :]
            z3 = (
                c[2, 0] * x[:, None, None] + c[2, 1] * x[None, :, None] + c[2, 2] * x[None, None, :]
            )
            # the basis on the grids of the first three variables from one evaluation (one
            # traced and compiled copy of sigma's Taylor expansion instead of three)
            small = (z1, z2, z3)
            ends = np.cumsum([z.size for z in small])
            flat = basis(jnp.concatenate([z.ravel() for z in small]))
            b1, b2, b3 = (
                flat[:, e - z.size : e].reshape(flat.shape[:1] + z.shape)
                for z, e in zip(small, ends, strict=True)
            )
            if d == 4:
                z4 = (
                    c[3, 0] * x[:, None, None, None]
                    + c[3, 1] * x[None, :, None, None]
                    + c[3, 2] * x[None, None, :, None]
                    + c[3, 3] * x[None, None, None, :]
                )
                i4 = jnp.einsum("bijkl,l->bijk", basis(z4), w)
                i3 = jnp.einsum("cijk,bijk,k->cbij", b3, i4, w)
            else:
                i3 = jnp.einsum("cijk,k->cij", b3, w)
            i2 = jnp.einsum("dij,...ij,j->d...i", b2, i3, w)
            return jnp.einsum("ei,...i,i->e...", b1, i2, w)

        out = _map(table, chol, 16)
        self._cache[key] = out
        return out

    def _multi_values(self, spec, subsets, d: int):
        """``[S, P]``: every pattern of a four-slot ``spec`` on ``d = 3, 4`` distinct inputs."""
        pats = _patterns(len(spec), d)
        nb = self._base()
        idx = []
        for pat in pats:
            factors = [[spec[s] for s in range(len(spec)) if pat[s] == j] for j in range(d)]
            ids = []
            for fac in factors:
                if self.homogeneous:
                    form = self._canon(fac)
                    if form is None:
                        ids = None
                        break
                    if form[0] == "delta":
                        raise ValueError(
                            f"kinks: the distributional second derivative of {self.act.name} "
                            "on three or four distinct inputs is not implemented; pass "
                            'kinks="pointwise" or use the pair layout (full=False)'
                        )
                if any(z for _, z in fac) or any(k >= nb for k, _ in fac):
                    raise ValueError(f"internal: no {d}-input table for {spec}")
                ids.append(sorted(k + 1 for k, _ in fac))
            idx.append(ids)
        tables = self._multi_tables(d, subsets)
        flat = tables.reshape(tables.shape[0], -1)
        # the error estimate on at most 16 subsets spread over the list (the rule's error
        # varies smoothly with the kernel; all of them would double the cost)
        sample = np.unique(np.linspace(0, len(subsets) - 1, min(16, len(subsets))).astype(int))
        lo = self._multi_tables(d, subsets, "4lo", rows=sample)
        flat_lo = lo.reshape(lo.shape[0], -1)
        nbp = nb + 1
        pair_pos = {
            (i, j): t for t, (i, j) in enumerate((i, j) for i in range(nbp) for j in range(i, nbp))
        }
        cols, zero = [], []
        for ids in idx:
            if ids is None:
                cols.append(0)
                zero.append(True)
                continue
            if d == 4:
                pos = np.ravel_multi_index([i[0] - 1 for i in ids], (nb,) * 4)
            else:
                sub = [pair_pos[(0, i[0])] if len(i) == 1 else pair_pos[(i[0], i[1])] for i in ids]
                pos = np.ravel_multi_index(sub, (len(pair_pos),) * 3)
            cols.append(int(pos))
            zero.append(False)
        cols = np.array(cols, np.int32)
        zero = jnp.asarray(np.array(zero))[None, :]
        vals = jnp.where(zero, 0.0, take(flat.T, (cols,)).T)
        vals_lo = jnp.where(zero, 0.0, take(flat_lo.T, (cols,)).T)
        vals_s = take(vals, (sample,))
        scale = jnp.maximum(jnp.max(jnp.abs(vals_s)), jnp.finfo(self.dtype).tiny)
        self._multi_err.append(jnp.max(jnp.abs(vals_s - vals_lo)) / scale)
        return vals

    def multi_error(self) -> jax.Array:
        """Estimated relative error of the three- and four-input moments used so far: for each
        moment, the largest change against a rule with two thirds of the nodes, relative to its
        largest value (``0`` when none was needed). Conservative: the difference of two rules
        bounds the error of the coarser one."""
        err = jnp.zeros((), self.dtype)
        for e in self._multi_err:
            err = jnp.maximum(err, e)
        return err


def rules(order: int, order_single: int, order_multi: int, dtype, *, shifted: bool = False):
    """The quadrature rules of :class:`Moments` as arrays.

    One and two inputs: the trapezoid rule of :mod:`rgnn.gaussian` (``order_single`` and
    ``order`` nodes on ``[-9, 9]``); with ``shifted`` the same number of nodes moved by half a
    spacing, an equally accurate rule whose difference from the first estimates the error of
    either (for an analytic integrand the trapezoid error is dominated by one aliased Fourier
    mode, whose sign the half-spacing shift reverses). Three and four inputs: Gauss-Hermite
    with ``order_multi`` nodes (``"4"``) and two thirds of them (``"4lo"``, for the estimate:
    the difference of the two is about the error of the coarser, so it bounds the error of
    ``"4"``; for tanh, whose poles at ``+-i pi / 2`` make Gauss-Hermite converge slowly, a rule
    only two nodes coarser underestimated the error by 2x at 12-16 nodes).
    Equal shapes in both variants, so one compilation serves both.
    """

    def trap(n):
        x, w = gaussian.hermite_rule(n, dtype)
        return _shift(x) if shifted else (x, w)

    return {
        "1": trap(order_single),
        "2": trap(order),
        "4": gaussian.hermite_rule(order_multi, dtype, rule="hermite"),
        "4lo": gaussian.hermite_rule(max(2, (2 * order_multi) // 3), dtype, rule="hermite"),
    }


@jax.jit
def _shift(x):
    """The trapezoid rule ``x`` moved by half its spacing, with its Gaussian weights (one
    compilation per node count, where the same operations run eagerly would compile one
    program each)."""
    x = x + (x[1] - x[0]) / 2
    w = jnp.exp(-0.5 * x * x)
    return x, w / jnp.sum(w)


def _barrier(x, fence=None):
    """``x``, materialised once (not fused into, and recomputed by, each of its readers).

    XLA:CPU removes optimization barriers before fusing, and its fusion duplicates cheap
    producers into every consumer: a moment tensor read by many update rules was recomputed
    inside each of them (most of a relu layer's time on many pairs). A conditional is never
    fused, so with ``fence`` (a traced scalar that is the same for every set of a ``vmap``,
    e.g. the layer's ``lambda_W``, so that the conditional stays one) ``x`` passes through
    one whose other branch (taken only for a NaN ``fence``) gives zeros."""
    if fence is None:
        return jax.lax.optimization_barrier(x)
    return jax.lax.cond(fence == fence, lambda v: v, lambda v: jax.tree.map(jnp.zeros_like, v), x)


def _weighted_sum(f, w):
    """``sum_i f[..., i] w[i]`` by pairwise summation of slices (elementwise additions).

    XLA:CPU hands a float32 ``reduce`` over the last axis to YNNPACK, whose reductions over a
    short axis (the 48 nodes of a quadrature rule) ran at tens of nanoseconds per element and
    took most of a smooth activation's time on many pairs; a tree of elementwise additions is
    fused with the products that feed it and never leaves XLA's own loops, and its rounding
    grows like ``log2`` of the number of nodes instead of linearly."""
    return sum_last(f * w.reshape((1,) * (f.ndim - 1) + w.shape))


def _map(f, xs, batch: int):
    """``lax.map(f, xs, batch_size=batch)`` with ``xs`` padded (by its first entry) to a
    multiple of ``batch``: ``lax.map`` traces and compiles ``f`` a second time for the
    remainder of a length that is not a multiple (a second copy of the three/four-input
    tables' program); fewer than ``batch`` entries are one ``vmap`` as before."""
    n = xs.shape[0]
    pad = -n % batch
    if n <= batch or not pad:
        return jax.lax.map(f, xs, batch_size=batch)
    xs = jnp.concatenate([xs, jnp.broadcast_to(xs[:1], (pad, *xs.shape[1:]))])
    return jax.lax.map(f, xs, batch_size=batch)[:n]


def _replace(ix: str, old: str, new: str) -> str:
    for o, n in zip(old, new, strict=True):
        ix = ix.replace(o, n)
    return ix
