r"""Criticality of the infinite-width kernel recursion: susceptibilities, phases, universality.

PDLT ch. 5. For one input, the infinite-width kernel obeys (standard parameterization,
``W ~ N(0, C_W / n)``, ``b ~ N(0, C_b)``; PDLT sec. 5.1)

.. math::

    K^{(l+1)} = f(K^{(l)}), \qquad f(K) = C_b + C_W\, g(K), \qquad
    g(K) = \langle \sigma(z)^2 \rangle_K ,

with :math:`\langle \cdot \rangle_K` the average over :math:`z \sim N(0, K)`. At a fixed point
:math:`K^\star = f(K^\star)` two susceptibilities govern how deviations flow (PDLT sec. 5.1):

.. math::

    \chi_\parallel(K) = C_W\, \frac{d g}{d K}
        = \frac{C_W}{2K^2} \langle \sigma(z)^2 (z^2 - K) \rangle_K , \qquad
    \chi_\perp(K) = C_W \langle \sigma'(z)^2 \rangle_K .

``chi_parallel = f'(K*)`` controls the variance (``K - K*`` shrinks by ``chi_parallel`` per
layer) and ``chi_perp`` the angle between two nearby inputs (it is also the NTK's per-layer
factor of the NTK recursion, THEORY.md). Heat-equation form (Gaussian integration by parts twice):
``dg/dK = <(sigma^2)''>_K / 2 = <sigma'^2 + sigma sigma''>_K``, so

.. math::

    \chi_\parallel - \chi_\perp = C_W \langle \sigma\, \sigma'' \rangle_K .

*Criticality* (PDLT sec. 5.2-5.3) is a fixed point with ``chi_parallel = chi_perp = 1``: the
kernel neither explodes nor vanishes exponentially and nearby inputs neither merge nor decorrelate
exponentially. Phases at a fixed point: *ordered* (``chi_perp < 1``, inputs merge), *chaotic*
(``chi_perp > 1``, inputs decorrelate).

Universality classes (a property of the activation, PDLT sec. 5.2-5.3; equation numbers are
left out here because they differ between the arXiv and print editions):

* ``"scale-invariant"`` (relu, leaky relu, linear): ``sigma(x) = a_+ x`` for ``x > 0`` and
  ``a_- x`` for ``x < 0``. Then ``g(K) = A_2 K`` and ``<sigma'^2>_K = A_2`` with
  ``A_2 = (a_+^2 + a_-^2) / 2``, so ``chi_parallel = chi_perp = C_W A_2`` for every ``K``
  (PDLT sec. 5.2). Critical at ``C_b = 0``, ``C_W = 1 / A_2``, where *every* ``K`` is a
  fixed point (relu: ``C_W = 2``; leaky relu of slope ``a``: ``2 / (1 + a^2)``; linear: 1).
* ``"K*=0"`` (tanh, erf, sin): ``sigma(0) = 0``, ``sigma'(0) != 0`` and
  ``a_1 = sigma'''(0)/sigma'(0) + (3/4) (sigma''(0)/sigma'(0))^2 < 0`` (PDLT sec. 5.3.3). At
  ``C_b = 0``, ``C_W = 1 / sigma'(0)^2`` the recursion is ``K' = K + a_1 K^2 + O(K^3)``: the
  fixed point ``K* = 0`` is approached as a power law ``K ~ 1 / (-a_1 l)``. tanh and erf have
  ``a_1 = -2``, sin ``a_1 = -1``; critical ``C_W``: tanh 1, erf ``pi/4``, sin 1.
* ``"other"``: a non-trivial critical point ``K* > 0``. From the identity above, criticality
  needs ``<sigma sigma''>_{K*} = 0``; then ``C_W = 1 / <sigma'^2>_{K*}`` and
  ``C_b = K* - C_W <sigma^2>_{K*}``, which must be ``>= 0``. GELU and SWISH have
  ``sigma(0) = 0`` and ``sigma'(0) = 1/2`` but ``a_1 > 0`` (GELU ``6/pi``, SWISH ``3/4``), so
  ``K* = 0`` repels and they belong here. For the exact GELU ``x Phi(x)`` the closed form
  (:mod:`rgnn._gelu`) gives ``<sigma sigma''>_K`` proportional to ``2 + 3K - K^2``, hence
  ``K* = (3 + sqrt(17)) / 2 = 3.5615528...``.
* ``"none"``: no critical point with ``C_b >= 0`` (sigmoid: ``sigma(0) != 0`` and
  ``<sigma sigma''>_K < 0`` for all ``K > 0``; softplus: ``sigma sigma'' > 0`` everywhere).

Residual MLPs (PDLT appendix B; ``shortcut=gamma``, ``branch=xi`` of :func:`criticality` and
:func:`critical_point`, constant over the layers). The single-input recursion
``K' = xi^2 (C_b + C_W g(K)) + gamma^2 K`` has the susceptibilities

.. math::

    \chi_\parallel = \gamma^2 + \xi^2 C_W g'(K), \qquad
    \chi_\perp = \gamma^2 + \xi^2 C_W \langle \sigma'^2 \rangle_K ,

and for ``gamma^2 < 1`` its fixed points are those of the plain recursion with the effective
``C~_W = xi^2 C_W / (1 - gamma^2)``, ``C~_b = xi^2 C_b / (1 - gamma^2)``, where
``chi - 1 = (1 - gamma^2) (chi~ - 1)``. So the critical point moves to
``(C_W, C_b) = (1 - gamma^2) / xi^2 x`` the plain one (same ``K*``, same universality class):
a shortcut of weight ``gamma`` asks for a branch of variance ``xi^2 C_W = (1 - gamma^2) C_W*``.
``gamma^2 >= 1`` has no critical point (``chi_parallel > 1``: ``K`` grows without bound).
How the shortcut changes the flow of the quartic coupling is computed, not in closed form: a
residual layer breaks the rotation symmetry among units, so the vertex recursion does not close
on ``V`` for a nonlinear activation, and :func:`rgnn.perturbative` runs the single-input flow of
:mod:`rgnn._residual_single` instead. The first residual layer is in closed form: for a
scale-invariant activation at criticality (``xi^2 C_W A_2 = 1 - gamma^2``,
``<sigma^4>_K = 3 A_4 K^2``) it adds
``(1 - gamma^2) [(1 - gamma^2)(3 A_4 / A_2^2 - 1) + 4 gamma^2]`` to ``V / K^2``, for relu
``(1 - gamma^2)(5 - gamma^2)`` (5 without shortcut, 0 as ``gamma -> 1``). Deeper layers add
more (the non-Gaussianity a unit carries along its own shortcut is not damped) and the
increment settles to a constant: relu with ``xi^2 = 1 - gamma^2`` adds 3.56, 5.06, 5.78, ...
per layer at ``gamma = 0.5``, settling at 6.50 (faster than the plain 5), and 0.80, 0.99, 1.15,
... at ``gamma = 0.9``, settling at 2.53 (0.24 rising to about 0.75 by layer 60 at
``gamma = 0.97``): only strong shortcuts tame the flow
(:func:`rgnn.plotting.plot_couplings` with ``shortcuts``).

Reference values (float64, this module; ``chi - 1`` below 1e-15 at each):

=======  ==========================  ==================  ==================
         ``K*``                      ``C_W``             ``C_b``
=======  ==========================  ==================  ==================
GELU     3.56155281281 (exact)       1.98305825744       0.172922390756
SWISH    14.3201736180               1.98800467827       0.555143170722
=======  ==========================  ==================  ==================

PDLT sec. 5.3 quotes GELU ``K* ~ 3.92, C_b ~ 0.17292, C_W ~ 1.98305`` and SWISH
``K* ~ 14.58, C_b ~ 0.5550, C_W ~ 1.988``: the ``C_W, C_b`` agree to every quoted digit, the
``K*`` do not, and the book's ``K*`` violate ``chi_perp = 1`` at its own ``C_W`` (by 3e-3 and
4e-4). ``K*`` is badly conditioned by the recursion itself: ``f(K) - K`` touches zero at
``K*`` with tiny curvature (GELU ``f'' = -2.9e-4``), so iterating the recursion approaches the
half-stable ``K*`` only as ``~ 1 / (|f''| l)`` (still ~0.35 away after ~2e4 layers for GELU),
and rounding ``C_W, C_b`` to the quoted digits moves or removes the touching root (at the
book's rounded values the only fixed points are ``K ~ 2.94`` and ``K ~ 12.06``). At the exact
critical ``C_W, C_b`` there is a second fixed point: GELU ``K = 3.03498`` (below, stable; ``K*``
attracts only from above), SWISH ``K = 14.59310`` (above; ``K*`` attracts only from below).

Numerics. Expectations use the activation's closed form on the diagonal ``k11 = k22 = k12 = K``
(:mod:`rgnn.activations`) when it has one, with ``dg/dK`` by ``jax.grad`` of it; otherwise the
trapezoid rule of :func:`rgnn.gaussian.expect` with ``order`` nodes, with ``dg/dK`` from the
integration-by-parts form ``<sigma^2 (z^2 - K)> / (2 K^2)`` (no derivative of ``sigma``, so kinks
are harmless). At ``K = 0`` the exact limits ``dg/dK = sigma'(0)^2 + sigma(0) sigma''(0)`` and
``<sigma'^2> = sigma'(0)^2`` are used. The default ``order = 2048`` resolves the activations of
the registry to ~1e-13 up to ``K ~ 10^3`` (trapezoid spacing ``18 / order`` in units of
``sqrt(K)``; see :mod:`rgnn.gaussian`). Roots are found with :func:`scipy.optimize.brentq`
(bracketing, superlinear, guaranteed to converge on a sign change) after a scan on a logarithmic
grid of ``K``. These are scalar computations, always done in float64 (whatever JAX's default
float is): near a critical point ``f(K) - K`` has a double zero, and in float32 its roundoff
creates spurious fixed points. Results are plain Python floats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from rgnn import gaussian
from rgnn._validate import check_finite
from rgnn.activations import Activation, get_activation

__all__ = ["Criticality", "criticality", "critical_point", "UNIVERSALITY_CLASSES"]

UNIVERSALITY_CLASSES = ("scale-invariant", "K*=0", "other", "none")

# Fixed points are looked for on 0 <= K <= 1e8: 20 points per decade, 400 per decade (0.6%
# spacing) on 1e-3 <= K <= 1e4 where touching roots next to other extrema of f(K) - K occur
# (SWISH: 1.3% apart), refined by brentq.
_FIXED_GRID = np.unique(
    np.concatenate(
        [
            [0.0],
            np.logspace(-6.0, -3.0, 61),
            np.logspace(-3.0, 4.0, 2801),
            np.logspace(4.0, 8.0, 81),
        ]
    )
)
# Non-trivial critical points are looked for on 1e-4 <= K <= 1e3.
_CRIT_GRID = np.logspace(-4.0, 3.0, 141)
_CRIT_RANGE = "1e-4 <= K <= 1e3"


@dataclasses.dataclass(frozen=True)
class Criticality:
    """Fixed point and susceptibilities of the single-input kernel recursion (PDLT ch. 5).

    All numbers are Python floats (scalars: no layer axis, this describes the deep limit).

    Attributes:
      activation: the activation's name.
      weight_var: ``C_W``.
      bias_var: ``C_b``.
      universality_class: class of the *activation* (not of this ``C_W, C_b``), one of
        :data:`UNIVERSALITY_CLASSES`; see the module docstring.
      fixed_point: ``K*``, the fixed point of ``K -> C_b + C_W <sigma^2>_K`` reached from the
        starting kernel (``k_init`` of :func:`criticality`; by default from ``K -> 0+``, which is
        where the monotone iteration from any smaller ``K^(1)`` ends). ``inf`` if ``K`` grows
        without bound; ``nan`` if every ``K`` is a fixed point (``every_k_fixed``).
      fixed_points: every fixed point found in ``0 <= K <= 1e8``, increasing (including
        touching, double roots of ``f(K) - K``).
      every_k_fixed: ``True`` for a scale-invariant activation at ``C_b = 0``,
        ``C_W = 1 / A_2``: ``f(K) = K`` for all ``K``.
      chi_parallel: ``C_W d<sigma^2>_K/dK`` at ``K*`` (``nan`` if ``K*`` is infinite; for the
        scale-invariant class it does not depend on ``K`` and is always given).
      chi_perp: ``C_W <sigma'^2>_K`` at ``K*`` (same conventions).
      is_critical: ``|chi_parallel - 1| <= tol`` and ``|chi_perp - 1| <= tol`` at a finite
        (or, for ``every_k_fixed``, any) fixed point.
      stability: of ``K*`` under the recursion: ``"stable"`` (``chi_parallel < 1 - tol``),
        ``"marginal"`` (within ``tol`` of 1: power-law or one-sided approach), ``"unstable"``,
        or ``"none"`` (no finite fixed point).
      phase: ``"ordered"`` (``chi_perp < 1 - tol``), ``"critical"`` (within ``tol``),
        ``"chaotic"`` (``chi_perp > 1 + tol``), or ``"unbounded"`` (``K`` grows without bound
        and ``chi_perp`` is not defined at a fixed point).
      tol: the tolerance used for the comparisons with 1.
      note: a sentence explaining special cases (no fixed point, line of fixed points, several
        fixed points, half-stable critical points); empty otherwise.
      shortcut, branch: the residual factors ``gamma, xi`` (``0, 1``: a plain MLP); the
        susceptibilities and fixed points are those of the residual recursion (module
        docstring).
    """

    activation: str
    weight_var: float
    bias_var: float
    universality_class: str
    fixed_point: float
    fixed_points: tuple[float, ...]
    every_k_fixed: bool
    chi_parallel: float
    chi_perp: float
    is_critical: bool
    stability: str
    phase: str
    tol: float
    note: str = ""
    shortcut: float = 0.0
    branch: float = 1.0

    @property
    def stable(self) -> bool:
        """Whether ``K*`` attracts nearby kernels exponentially (``chi_parallel < 1``)."""
        return self.stability == "stable"

    def __str__(self) -> str:
        if self.every_k_fixed:
            fp = "every K (line of fixed points)"
        elif math.isinf(self.fixed_point):
            fp = "none: K grows without bound"
        else:
            fp = f"{self.fixed_point:.12g} ({self.stability})"
        res = (
            f", shortcut gamma = {self.shortcut:.6g}, branch xi = {self.branch:.6g}"
            if (self.shortcut, self.branch) != (0.0, 1.0)
            else ""
        )
        lines = [
            f"Criticality of {self.activation} at C_W = {self.weight_var:.12g}, "
            f"C_b = {self.bias_var:.12g}{res}",
            f"  universality class : {self.universality_class}",
            f"  fixed point K*     : {fp}",
            f"  chi_parallel       : {self.chi_parallel:.12g}",
            f"  chi_perp           : {self.chi_perp:.12g}",
            f"  phase              : {self.phase}",
            f"  critical           : {'yes' if self.is_critical else 'no'} (tol {self.tol:g})",
        ]
        if len(self.fixed_points) > 1:
            lines.append(
                "  all fixed points   : " + ", ".join(f"{k:.10g}" for k in self.fixed_points)
            )
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_variance(value, name: str, *, positive: bool = False) -> float:
    """A finite real number ``>= 0`` (``> 0`` if ``positive``) as a float, else ValueError."""
    expected = "a finite number > 0" if positive else "a finite number >= 0"
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - anything unconvertible is bad input
        raise ValueError(f"{name}: expected {expected}, got {value!r}") from err
    if arr.ndim != 0 or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name}: expected {expected} (a real scalar), got {value!r}")
    x = float(arr)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return x


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, int | np.integer) or order < 2:
        raise ValueError(f"order: expected an integer >= 2 (quadrature nodes), got {order!r}")
    return int(order)


def _default_tol(dtype) -> float:
    return 1e-8 if jnp.dtype(dtype) == jnp.dtype("float64") else 1e-4


def _check_tol(tol, dtype) -> float:
    if tol is None:
        return _default_tol(dtype)
    return _check_variance(tol, "tol", positive=True)


# ---------------------------------------------------------------------------------------------
# Gaussian moments on the diagonal


@partial(jax.jit, static_argnames=("act", "order"))
def _moments(act: Activation, k: jax.Array, order: int):
    """``(g, dg/dK, h)`` with ``g = <sigma^2>_K``, ``h = <sigma'^2>_K``, elementwise over ``k``."""
    zero = jnp.zeros((), k.dtype)
    d1 = jax.grad(act.fn)
    s0, s1, s2 = act.fn(zero), d1(zero), jax.grad(d1)(zero)
    kpos = jnp.where(k > 0, k, jnp.ones_like(k))
    if act.nngp_map is not None:
        g = act.nngp_map(k, k, k)
        dg = jnp.vectorize(jax.grad(lambda t: act.nngp_map(t, t, t)))(kpos)
    else:
        g = gaussian.expect(lambda u: act.fn(u) ** 2, k, order=order)
        kk = kpos[..., None]
        ibp = gaussian.expect(lambda u: act.fn(u) ** 2 * (u * u - kk), kpos, order=order)
        dg = ibp / (2.0 * kpos * kpos)
    if act.ntk_map is not None:
        h = act.ntk_map(kpos, kpos, kpos)
    else:
        h = gaussian.expect(lambda u: act.derivative(u) ** 2, k, order=order)
    dg = jnp.where(k > 0, dg, s1 * s1 + s0 * s2)
    h = jnp.where(k > 0, h, s1 * s1)
    return g, dg, h


class _Diag:
    """Scalar and gridded access to ``_moments`` in the default float dtype."""

    def __init__(self, act: Activation, order: int):
        self.act, self.order = act, order
        self.dtype = jnp.result_type(float)

    def grid(self, k: np.ndarray):
        out = _moments(self.act, jnp.asarray(k, self.dtype), self.order)
        return tuple(np.asarray(o, np.float64) for o in out)

    def at(self, k: float):
        g, dg, h = self.grid(np.array([k]))
        return float(g[0]), float(dg[0]), float(h[0])


def _derivatives_at_zero(act: Activation, dtype) -> tuple[float, float, float, float]:
    """``sigma(0), sigma'(0), sigma''(0), sigma'''(0)`` by automatic differentiation."""
    zero = jnp.zeros((), dtype)
    fs = [act.fn]
    for _ in range(3):
        fs.append(jax.grad(fs[-1]))
    return tuple(float(f(zero)) for f in fs)


def _scale_invariant_a2(act: Activation, dtype) -> float | None:
    """``A_2 = (a_+^2 + a_-^2) / 2`` if ``sigma`` is positively homogeneous, else ``None``.

    Registry activations carry the flag; a callable is tested on a grid: ``sigma(l x) =
    l sigma(x)`` for ``l = 2, 1/2`` and ``|x| <= 4``, to ``1e3`` ulps of ``max |sigma|``.
    """
    if not act.scale_invariant:
        x = jnp.linspace(-4.0, 4.0, 81, dtype=dtype)
        try:
            y, y2, yh = (np.asarray(act.fn(s * x), np.float64) for s in (1.0, 2.0, 0.5))
        except Exception:  # noqa: BLE001 - a callable that fails here is not classified as such
            return None
        scale = max(float(np.max(np.abs(y))), 1e-300)
        atol = 1e3 * float(jnp.finfo(dtype).eps) * scale
        if not (np.all(np.abs(y2 - 2 * y) <= 2 * atol) and np.all(np.abs(yh - 0.5 * y) <= atol)):
            return None
    one = jnp.ones((), dtype)
    a_plus, a_minus = float(act.fn(one)), -float(act.fn(-one))
    return 0.5 * (a_plus * a_plus + a_minus * a_minus)


# ---------------------------------------------------------------------------------------------
# Classification


@dataclasses.dataclass(frozen=True)
class _Class:
    name: str
    reason: str
    a2: float | None = None  # scale-invariant: A_2
    sigma1: float | None = None  # K*=0: sigma'(0)
    candidates: tuple[tuple[float, float, float], ...] = ()  # other: (K*, C_W, C_b)


def _brentq(fun: Callable[[float], float], a: float, b: float) -> float:
    return float(scipy.optimize.brentq(fun, a, b, xtol=1e-300, rtol=8.9e-16, maxiter=200))


def _nontrivial(diag: _Diag) -> tuple[tuple[tuple[float, float, float], ...], str]:
    """Zeros ``K > 0`` of ``<sigma sigma''>_K = dg/dK - <sigma'^2>`` with ``C_b >= 0``."""
    k = _CRIT_GRID
    g, dg, h = diag.grid(k)
    d = dg - h
    eps = float(jnp.finfo(diag.dtype).eps)

    def gap(t):
        _, dgt, ht = diag.at(t)
        return dgt - ht

    found = []
    for i in range(len(k) - 1):
        if not (np.isfinite(d[i]) and np.isfinite(d[i + 1])) or d[i] * d[i + 1] > 0:
            continue
        ks = float(k[i]) if d[i] == 0 else _brentq(gap, k[i], k[i + 1])
        gs, _, hs = diag.at(ks)
        if not hs > 0:
            continue
        cw = 1.0 / hs
        cb = ks - cw * gs
        if cb >= -1e3 * eps * ks:
            found.append((ks, cw, max(cb, 0.0)))
    if found:
        return tuple(found), ""
    finite = d[np.isfinite(d)]
    if finite.size and np.all(finite > 0):
        sign = "positive"
    elif finite.size and np.all(finite < 0):
        sign = "negative"
    else:
        sign = "zero only where C_b = K - <sigma^2>/<sigma'^2> < 0"
    return (), (
        f"chi_parallel - chi_perp = C_W <sigma sigma''>_K is {sign} for {_CRIT_RANGE}, "
        "so chi_parallel = chi_perp = 1 never holds at a fixed point with C_b >= 0"
    )


def _classify(act: Activation, order: int, dtype) -> _Class:
    """The universality class of ``act`` (PDLT sec. 5.3), see the module docstring."""
    a2 = _scale_invariant_a2(act, dtype)
    if a2 is not None:
        if not a2 > 0:
            return _Class("none", "sigma vanishes identically")
        return _Class("scale-invariant", "sigma(l x) = l sigma(x) for l > 0", a2=a2)
    s0, s1, s2, s3 = _derivatives_at_zero(act, dtype)
    eps = float(jnp.finfo(dtype).eps)
    a1 = None
    if abs(s0) <= 1e3 * eps * max(1.0, abs(s1)) and abs(s1) > 1e3 * eps:
        a1 = s3 / s1 + 0.75 * (s2 / s1) ** 2
        if a1 < 0:
            return _Class(
                "K*=0", f"sigma(0) = 0, sigma'(0) = {s1:.6g}, a_1 = {a1:.6g} < 0", sigma1=s1
            )
    cands, reason = _nontrivial(_Diag(act, order))
    if cands:
        return _Class("other", "<sigma sigma''>_K* = 0 at K* > 0", candidates=cands)
    if a1 is not None:
        why = f"sigma(0) = 0 but a_1 = {a1:.6g} >= 0, so K* = 0 repels; and {reason}"
    elif abs(s0) > 1e3 * eps * max(1.0, abs(s1)):
        why = f"sigma(0) = {s0:.6g} != 0, so K* = 0 is not a fixed point; and {reason}"
    else:
        why = f"sigma(0) = sigma'(0) = 0; and {reason}"
    return _Class("none", why)


# ---------------------------------------------------------------------------------------------
# Fixed points


def _find_fixed_points(diag: _Diag, cw: float, cb: float):
    """Roots of ``F(K) = C_b + C_W g(K) - K`` on ``0 <= K <= 1e8``, and ``F`` as a function.

    Simple roots from sign changes of ``F`` on ``_FIXED_GRID``; touching (double) roots from the
    sign changes of ``F' = chi_parallel - 1`` where ``|F| <= 1e3 eps max(1, K)``. A touching
    root within one grid step (0.6% in ``1e-3 <= K <= 1e4``) of another extremum of ``F`` can
    be missed.
    """
    eps = float(jnp.finfo(diag.dtype).eps)

    def atol(k):
        return 1e3 * eps * max(1.0, k)

    def f(t):
        return cb + cw * diag.at(t)[0] - t

    def fp(t):
        return cw * diag.at(t)[1] - 1.0

    k = _FIXED_GRID
    g, dg, _ = diag.grid(k)
    fk = cb + cw * g - k
    fpk = cw * dg - 1.0
    roots = []
    if abs(fk[0]) <= atol(0.0):
        roots.append(0.0)
    for i in range(len(k) - 1):
        a, b = fk[i], fk[i + 1]
        if np.isfinite(a) and np.isfinite(b) and a * b < 0:
            roots.append(_brentq(f, k[i], k[i + 1]))
        if i > 0 and np.isfinite(fpk[i]) and np.isfinite(fpk[i + 1]) and fpk[i] * fpk[i + 1] < 0:
            ke = _brentq(fp, k[i], k[i + 1])
            if abs(f(ke)) <= atol(ke):
                roots.append(ke)
    roots.sort()
    merged: list[float] = []
    for r in roots:
        if merged and abs(r - merged[-1]) <= 1e-9 * max(1.0, r):
            continue
        merged.append(r)
    return tuple(merged), f


def _select(roots: tuple[float, ...], f, k_init: float | None, eps: float) -> float:
    """The fixed point the (monotone) iteration ``K -> K + F(K)`` reaches from ``k_init``."""
    if k_init is None:
        k0 = float(_FIXED_GRID[1])
        if roots and roots[0] == 0.0 and f(k0) <= 0:
            return 0.0
        above = [r for r in roots if r > 0]
        return above[0] if above else math.inf
    value = f(k_init)
    if abs(value) <= 1e3 * eps * max(1.0, k_init):
        return min(roots, key=lambda r: abs(r - k_init)) if roots else float(k_init)
    if value > 0:
        above = [r for r in roots if r >= k_init]
        return above[0] if above else math.inf
    below = [r for r in roots if r <= k_init]
    return below[-1] if below else 0.0


def _labels(chi_par: float, chi_perp: float, tol: float) -> tuple[str, str]:
    stability = "stable" if chi_par < 1 - tol else ("unstable" if chi_par > 1 + tol else "marginal")
    phase = "ordered" if chi_perp < 1 - tol else ("chaotic" if chi_perp > 1 + tol else "critical")
    return stability, phase


def _scale_invariant_result(
    act: Activation, cls: _Class, cw: float, cb: float, tol: float, k_init: float | None
) -> Criticality:
    x = cw * cls.a2
    stability, phase = _labels(x, x, tol)
    every, note, roots = False, "", ()
    if abs(x - 1) <= tol and cb == 0:
        every, kstar, roots = True, math.nan, ()
        note = (
            "every K is a fixed point (C_b = 0, C_W A_2 = 1): the kernel is preserved at all "
            "depths, and chi_parallel = chi_perp = C_W A_2 for every K"
        )
    elif x < 1 - tol:
        kstar = cb / (1 - x)
        roots = (kstar,)
    else:
        roots = (0.0,) if cb == 0 else ()
        kstar = 0.0 if (cb == 0 and k_init == 0) else math.inf
        if math.isinf(kstar):
            stability = "none"
            note = (
                f"K grows without bound (C_W A_2 = {x:.12g} >= 1 with C_b > 0, or > 1): "
                "chi_parallel, chi_perp are the K-independent values C_W A_2"
            )
    critical = abs(x - 1) <= tol and (every or math.isfinite(kstar))
    return Criticality(
        act.name, cw, cb, cls.name, kstar, roots, every, x, x, critical, stability, phase, tol, note
    )


def _evaluate(
    act: Activation,
    cls: _Class,
    cw: float,
    cb: float,
    kstar: float,
    roots: tuple[float, ...],
    diag: _Diag,
    tol: float,
    note: str = "",
) -> Criticality:
    if math.isinf(kstar):
        chi_par = chi_perp = math.nan
        stability, phase = "none", "unbounded"
        note = note or (
            "no fixed point: C_b + C_W <sigma^2>_K > K for every K <= 1e8, so K grows "
            "without bound with depth"
        )
        critical = False
    else:
        _, dg, h = diag.at(kstar)
        chi_par, chi_perp = cw * dg, cw * h
        stability, phase = _labels(chi_par, chi_perp, tol)
        critical = abs(chi_par - 1) <= tol and abs(chi_perp - 1) <= tol
        others = [r for r in roots if abs(r - kstar) > 1e-9 * max(1.0, kstar)]
        if others and not note:
            note = (
                "other fixed points: "
                + ", ".join(f"{r:.10g}" for r in others)
                + " (pass k_init to select the one reached from a given K^(1))"
            )
    return Criticality(
        act.name,
        cw,
        cb,
        cls.name,
        float(kstar),
        roots,
        False,
        float(chi_par),
        float(chi_perp),
        bool(critical),
        stability,
        phase,
        tol,
        note,
    )


# ---------------------------------------------------------------------------------------------
# Public API


def criticality(
    activation: str | Callable | Activation,
    weight_var: float,
    bias_var: float,
    *,
    order: int = 2048,
    tol: float | None = None,
    k_init: float | None = None,
    shortcut: float = 0.0,
    branch: float = 1.0,
) -> Criticality:
    r"""Fixed point, susceptibilities, phase and universality class at ``(C_W, C_b)``.

    Standard parameterization, ``W ~ N(0, C_W / n)``, ``b ~ N(0, C_b)``. With
    ``g(K) = <sigma(z)^2>_K``:

    .. math::

        K^\star = C_b + C_W g(K^\star), \quad
        \chi_\parallel = C_W g'(K^\star) = \frac{C_W}{2K^{\star 2}}
            \langle \sigma^2 (z^2 - K^\star) \rangle_{K^\star}, \quad
        \chi_\perp = C_W \langle \sigma'^2 \rangle_{K^\star}

    (PDLT sec. 5.1). ``K*`` is the fixed point reached by iterating the recursion from
    ``k_init`` (default: from ``K -> 0+``, i.e. from any ``K^(1)`` below the smallest attracting
    fixed point); every fixed point found is listed in ``fixed_points``. For the
    scale-invariant class everything is exact (``g = A_2 K``), see the module docstring.

    Args:
      activation: a registry name, an :class:`~rgnn.activations.Activation`, or a
        JAX-traceable callable (classified numerically).
      weight_var: ``C_W >= 0``.
      bias_var: ``C_b >= 0``.
      order: trapezoid nodes for activations without a closed form (:mod:`rgnn.gaussian`).
      tol: tolerance of ``|chi - 1|`` for ``is_critical``, phase and stability (default 1e-8).
      k_init: optional starting kernel ``K^(1) >= 0`` that selects which fixed point is
        reported when there are several.
      shortcut, branch: the residual factors ``gamma`` (``|gamma| < 1``) and ``xi``
        (``!= 0``) of a residual MLP (module docstring): its susceptibilities
        ``gamma^2 + xi^2 chi`` and fixed points; the default ``0, 1`` is the plain MLP.
        ``tol`` applies to ``chi~ - 1 = (chi - 1) / (1 - gamma^2)``.

    Returns:
      A :class:`Criticality` of Python floats.

    Raises:
      ValueError: for an unknown activation, negative or non-finite variances, a bad ``order``,
        ``tol`` or ``k_init``.

    Example::

        >>> print(rgnn.criticality("tanh", 1.5, 0.0).phase)
        chaotic
    """
    gamma, xi = _check_residual(shortcut, branch)
    if (gamma, xi) != (0.0, 1.0):
        cw = _check_variance(weight_var, "weight_var")
        cb = _check_variance(bias_var, "bias_var")
        scale = xi * xi / (1.0 - gamma * gamma)
        plain = criticality(activation, cw * scale, cb * scale, order=order, tol=tol, k_init=k_init)
        return _residual_result(plain, gamma, xi)
    with jax.enable_x64(True):
        return _criticality(activation, weight_var, bias_var, order, tol, k_init)


def _check_residual(shortcut, branch) -> tuple[float, float]:
    vals = []
    for name, v in (("shortcut", shortcut), ("branch", branch)):
        vals.append(check_finite(name, v))
    gamma, xi = vals
    if not gamma * gamma < 1.0:
        raise ValueError(
            f"shortcut: expected |gamma| < 1, got {shortcut!r}: with gamma^2 >= 1 the kernel "
            "grows without bound (chi_parallel = gamma^2 + xi^2 C_W g'(K) > 1), no criticality"
        )
    if xi == 0.0:
        raise ValueError("branch: expected xi != 0 (a residual layer with no branch)")
    return gamma, xi


def _residual_result(plain: Criticality, gamma: float, xi: float) -> Criticality:
    """The residual MLP's :class:`Criticality` from the plain one at ``C~ = xi^2 C / (1 -
    gamma^2)``: the same fixed points, ``chi = gamma^2 + (1 - gamma^2) chi~``."""
    g2, scale = gamma * gamma, xi * xi / (1.0 - gamma * gamma)

    def chi(c):
        return g2 + (1.0 - g2) * c

    return dataclasses.replace(
        plain,
        weight_var=plain.weight_var / scale,
        bias_var=plain.bias_var / scale,
        chi_parallel=chi(plain.chi_parallel),
        chi_perp=chi(plain.chi_perp),
        shortcut=gamma,
        branch=xi,
        note=plain.note
        + (
            f" (residual MLP: the values in this note are those of the plain recursion at the "
            f"effective C_W = {plain.weight_var:.12g}, C_b = {plain.bias_var:.12g})"
            if plain.note
            else ""
        ),
    )


def _criticality(activation, weight_var, bias_var, order, tol, k_init):
    act = get_activation(activation)
    cw = _check_variance(weight_var, "weight_var")
    cb = _check_variance(bias_var, "bias_var")
    order = _check_order(order)
    dtype = jnp.result_type(float)
    tol = _check_tol(tol, dtype)
    if k_init is not None:
        k_init = _check_variance(k_init, "k_init")
    cls = _classify(act, order, dtype)
    if cls.name == "scale-invariant":
        return _scale_invariant_result(act, cls, cw, cb, tol, k_init)
    diag = _Diag(act, order)
    roots, f = _find_fixed_points(diag, cw, cb)
    kstar = _select(roots, f, k_init, float(jnp.finfo(dtype).eps))
    return _evaluate(act, cls, cw, cb, kstar, roots, diag, tol)


def critical_point(
    activation: str | Callable | Activation,
    *,
    order: int = 2048,
    tol: float | None = None,
    shortcut: float = 0.0,
    branch: float = 1.0,
) -> Criticality:
    r"""The critical initialization ``(C_b, C_W)`` of ``activation`` and its :class:`Criticality`.

    With ``shortcut=gamma`` (``|gamma| < 1``) and ``branch=xi`` (a residual MLP, module
    docstring) the critical ``(C_W, C_b)`` are the plain ones times ``(1 - gamma^2) / xi^2``,
    at the same ``K*``.

    Solves ``K* = C_b + C_W <sigma^2>_{K*}``, ``chi_parallel(K*) = chi_perp(K*) = 1``
    (PDLT sec. 5.2-5.3) by universality class:

    * scale-invariant: ``C_b = 0``, ``C_W = 1 / A_2``, ``A_2 = (a_+^2 + a_-^2) / 2`` (PDLT
      sec. 5.2); every ``K`` is then a fixed point (``every_k_fixed``, ``fixed_point = nan``).
    * ``K*=0``: ``C_b = 0``, ``C_W = 1 / sigma'(0)^2``, ``K* = 0`` (PDLT sec. 5.3.3).
    * other: since ``chi_parallel - chi_perp = C_W <sigma sigma''>_K``, the three conditions
      reduce to one equation in one unknown, ``<sigma sigma''>_{K*} = 0``, solved with
      :func:`scipy.optimize.brentq` after a scan of ``1e-4 <= K <= 1e3``; then
      ``C_W = 1 / <sigma'^2>_{K*}`` and ``C_b = K* - C_W <sigma^2>_{K*}`` (kept if ``>= 0``). If
      several zeros qualify, the smallest ``K*`` is returned and the others are named in
      ``note``. Such a point is generically *not* an attractor from both sides: ``f(K) - K``
      has a double zero at ``K*`` (``chi_parallel = 1``), and other fixed points may exist.

    Raises:
      ValueError: ``"activation: <name> has no critical point (<reason>)"`` for the class
        ``"none"`` (e.g. sigmoid, softplus); also for bad ``order``/``tol`` or an unknown name.
    """
    gamma, xi = _check_residual(shortcut, branch)
    if (gamma, xi) != (0.0, 1.0):
        return _residual_result(critical_point(activation, order=order, tol=tol), gamma, xi)
    with jax.enable_x64(True):
        return _critical_point(activation, order, tol)


def _critical_point(activation, order, tol):
    act = get_activation(activation)
    order = _check_order(order)
    dtype = jnp.result_type(float)
    tol = _check_tol(tol, dtype)
    cls = _classify(act, order, dtype)
    if cls.name == "none":
        raise ValueError(f"activation: {act.name} has no critical point ({cls.reason})")
    if cls.name == "scale-invariant":
        return _scale_invariant_result(act, cls, 1.0 / cls.a2, 0.0, tol, None)
    diag = _Diag(act, order)
    if cls.name == "K*=0":
        cw, cb, kstar = 1.0 / cls.sigma1**2, 0.0, 0.0
        roots, _ = _find_fixed_points(diag, cw, cb)
        return _evaluate(act, cls, cw, cb, kstar, roots, diag, tol)
    kstar, cw, cb = cls.candidates[0]
    roots, f = _find_fixed_points(diag, cw, cb)
    if not any(abs(r - kstar) <= 1e-9 * max(1.0, kstar) for r in roots):
        roots = tuple(sorted(roots + (kstar,)))
    others = [r for r in roots if abs(r - kstar) > 1e-9 * max(1.0, kstar)]
    # f(K) - K has a double zero at K* (chi_parallel = 1): its sign on both sides says from
    # which side the recursion is attracted (PDLT calls such fixed points half-stable).
    delta = 1e-3 * kstar
    side = "above" if f(kstar + delta) < 0 and f(kstar - delta) < 0 else "below"
    note = (
        "critical point from <sigma sigma''>_K* = 0; f(K) - K touches zero at K*, which is "
        f"half-stable (approached only from {side}, as a power law)"
    )
    if others:
        note += "; other fixed points at these C_W, C_b: " + ", ".join(f"{r:.10g}" for r in others)
    if len(cls.candidates) > 1:
        note += "; further critical K*: " + ", ".join(f"{c[0]:.10g}" for c in cls.candidates[1:])
    return _evaluate(act, cls, cw, cb, kstar, roots, diag, tol, note)
