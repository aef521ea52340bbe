"""Explicit renormalization: Wilsonian coarse-graining of kernels over their eigenmodes.

Source: J. N. Howard, R. Jefferson, A. Maiti, Z. Ringel, "Wilsonian renormalization of neural
network Gaussian processes", Mach. Learn.: Sci. Technol. 6, 025038 (2025), arXiv:2405.06008.
Their idea: in GP regression, the kernel eigenmodes that the data cannot resolve can be
integrated out, and what they leave behind is a renormalized (running) ridge; the data set the
IR scale. What follows is derived here, for finite data, in the form this module computes.

**Setup.** A kernel ``k`` (an NNGP or NTK of :func:`rgnn.fixed_point`, or any other) on inputs
drawn from a distribution ``p(x)`` has the Mercer expansion
``k(x, x') = sum_k lambda_k phi_k(x) phi_k(x')`` with ``E_p[phi_k phi_q] = delta_kq``. GP
regression with ridge (noise variance) ``sigma^2`` on ``N`` training pairs ``(x_mu, y_mu)`` is
the field theory of ``f = sum_k f_k phi_k`` with action

.. math::

    S[f] = \\frac{1}{2\\sigma^2} \\sum_{\\mu=1}^{N} (f(x_\\mu) - y_\\mu)^2
        + \\frac12 \\sum_k \\frac{f_k^2}{\\lambda_k},

whose mean is the posterior mean ``f_bar(x) = k(x, X) (K + sigma^2 I)^{-1} y``.

**Integrating out the modes below a cutoff.** Split ``f = f_< + f_>`` at ``Lambda``: ``f_<``
holds the modes with ``lambda_k >= Lambda`` (kept), ``f_>`` those with ``lambda_k < Lambda``
(integrated out). On the training inputs ``f_>(X)`` is Gaussian with covariance
``K^>_{mu nu} = sum_{lambda_k < Lambda} lambda_k phi_k(x_mu) phi_k(x_nu)``, independent of
``f_<`` under the prior, so the Gaussian integral over ``f_>`` gives exactly

.. math::

    S_\\Lambda[f_<] = \\frac12 (y - f_<(X))^\\top (\\sigma^2 I + K^>)^{-1} (y - f_<(X))
        + \\frac12 \\sum_{\\lambda_k \\ge \\Lambda} \\frac{f_k^2}{\\lambda_k} + \\text{const}:

the integrated-out modes become correlated noise on the training targets. This step is exact;
the effective theory's posterior mean of the kept modes is
``k_<(x, X) (K + sigma^2 I)^{-1} y``, the kept-mode component of the full posterior mean
(``exact_test`` below).

**The running ridge (the approximation).** Replace the noise matrix by its trace per sample,
``K^> -> (tr K^> / N) I``. The action keeps its form with ``sigma^2`` renormalized,

.. math::

    \\sigma^2(\\Lambda) = \\sigma^2 + \\frac1N \\sum_{\\mu=1}^{N} K^>(x_\\mu, x_\\mu)
        = \\sigma^2 + \\frac1N \\sum_\\mu \\sum_{\\lambda_k < \\Lambda}
          \\lambda_k\\, \\phi_k(x_\\mu)^2 ,

and the flow equation, raising the cutoff (integrating out more modes), averaged over draws of
the training set (``E_p[phi_k^2] = 1``), is

.. math::

    \\frac{d \\sigma^2(\\Lambda)}{d \\Lambda} = \\Lambda\\, \\rho(\\Lambda), \\qquad
    \\sigma^2(\\Lambda) = \\sigma^2 + \\sum_{\\lambda_k < \\Lambda} \\lambda_k,

with ``rho(lambda) = sum_k delta(lambda - lambda_k)`` the density of population eigenvalues.
Over draws of the training set the diagonal entries of ``K^>`` average to
``sum_{lambda_k < Lambda} lambda_k`` (so the trace is kept in expectation), and the
off-diagonal ones to ``sum_{lambda_k < Lambda} lambda_k (E_p phi_k)^2``: zero for modes
orthogonal to the constant function (on the sphere, every harmonic but the constant one),
small for the oscillating modes at the bottom of a spectrum, but not zero in general. Dropping
the off-diagonal part is a good approximation when the integrated-out modes are unlearnable,
``N lambda_k << sigma^2(Lambda)`` for each of them (then the fluctuations of ``K^>`` about
its diagonal are small beside the noise), i.e. for cutoffs below the IR scale
``sigma^2(Lambda) / N`` the data set; and when at least ``N`` modes are integrated out, so
that ``K^>`` has full rank on the training inputs (:attr:`Wilsonian.valid` flags the cutoffs
where both hold). Keeping the diagonal but not the trace gives an input-dependent ridge
``sigma^2 + K^>(x_mu, x_mu)`` (``local_ridge``). Howard et al. report that the ridge becomes
input-dependent once non-Gaussianities are included; this diagonal form is the analogue in the
Gaussian theory computed here, not their formula. For a dot-product kernel on inputs uniform on
a sphere, cut between complete spherical-harmonic shells, the diagonal is constant (the
addition theorem) and the local ridge equals the running one.

**Plain truncation** keeps the same modes with the bare ridge ``sigma^2``: the integrated-out
part of the data is then fit by the kept modes (aliasing), which the running ridge prevents.

**The Gaussian case in closed form.** For Gaussian inputs ``x ~ N(0, s^2 I_d)`` and the
Gaussian (RBF) kernel ``exp(-|x - x'|^2 / (2 l^2))`` the spectrum is known (Zhu et al. 1998;
Rasmussen & Williams, *Gaussian Processes for Machine Learning*, 2006, sec. 4.3.1, eq. 4.41):
with ``a = 1/(4 s^2)``, ``b = 1/(2 l^2)``, ``c = sqrt(a^2 + 2ab)``, ``A = a + b + c``,
``B = b/A``, the eigenvalues are ``lambda_j = (2a/A)^{d/2} B^j`` with degeneracy
``binom(j + d - 1, d - 1)`` (``j`` the total Hermite degree), so

.. math::

    \\sigma^2(\\Lambda) = \\sigma^2 + \\Big(\\frac{2a}{A}\\Big)^{d/2}
        \\sum_{j:\\ \\lambda_j < \\Lambda} \\binom{j + d - 1}{d - 1} B^j
        \\;\\overset{d=1}{=}\\; \\sigma^2 + \\sqrt{\\frac{2a}{A}}\\,\\frac{B^{j_\\Lambda}}{1 - B},

``j_Lambda`` the lowest degree below the cutoff (:func:`rbf_running_ridge`). A power-law
spectrum ``lambda_k = c k^{-alpha}`` gives ``sigma^2(Lambda) - sigma^2 ~
c^{1/alpha} Lambda^{1 - 1/alpha} / (alpha - 1)``.

**Modes on finite data.** The population eigenfunctions are estimated from all ``P = N + M``
inputs, training and test together (all drawn from ``p``): the joint Gram matrix
``K_P = sum_k mu_k psi_k psi_k^T`` gives ``lambda_k ~ mu_k / P`` and
``phi_k(x_a) ~ sqrt(P) psi_{ka}``, and the split ``K = K^< + K^>`` is exact on every input.
That the modes are orthonormal over all ``P`` inputs but not over the ``N`` training inputs is
what makes the ridge run: with modes from the training Gram matrix alone, ``K^>`` would vanish
on the span of the kept modes and truncation would be exact. Use ``M >= N`` test inputs.

**Ties.** A computed eigenvalue carries the eigensolver's roundoff, of order
``eps ||K_P|| = P eps lambda_1`` (``lambda_1`` the largest), so a cutoff within that distance of
an eigenvalue cannot tell which side the eigenvalue lies on. Such a cutoff counts as *at* the
eigenvalue, and keeps its mode: a mode is kept when ``lambda_k >= Lambda - P eps lambda_1``
(``eps`` of the kernels' dtype). The default grid starts and ends on eigenvalues by design (the
top one, kept; the smallest one, so every mode is kept), and the counts there do not hang on
the last bit of the eigensolver or of ``exp(log(.))``.

**Non-Gaussian (1/n) corrections: out of reach here, precisely why.** At finite width the
prior gains the quartic term ``-(1/8) v^{(ab)(cd)} f_a f_b f_c f_d`` with
``v ~ K^{-1} K^{-1} V K^{-1} K^{-1} / n`` (PDLT ch. 4). Without data, marginalizing modes is
restriction of cumulants, so in the eigenbasis nothing runs at first order. With data, to first
order in ``v``, integrating out ``f_>`` (i) shifts the kept modes' quadratic term by the
contraction of ``v`` with the conditional covariance of ``f_>`` given the data (a tadpole), and
(ii) renormalizes the kept quartic coupling by substituting for every ``f_>`` leg its
conditional mean ``K^>_{xX} (sigma^2 I + K^>)^{-1} (y - f_<(X))``, which is linear in
``f_<``. Both need the vertex ``V_{(ab)(cd)}`` with four distinct inputs: contracted with
eigenvectors, every quadruple of the ``P`` inputs contributes, while :mod:`rgnn.perturbative`
gives ``V`` on pairs of inputs (components ``(aa, ab, bb)``) and in full only on sets of at most
four inputs. What would be needed: the vertex on all quadruples through the layer recursion,
whose ``Cov[s_a s_b, s_c s_d]`` needs a 4-D Gaussian integral for each of the ``binom(P, 4)``
quadruples of distinct inputs (at ``P = 64`` and 48 nodes per dimension, about ``6e5 x 5e6 =
3e12`` activation evaluations per layer; storage ``(P (P + 1) / 2)^2`` entries, 35 MB per
layer in float64), or a Monte Carlo estimate of ``Cov(G_ab, G_cd)`` on all pairs from an
ensemble (``4e6`` entries at ``P = 64``), with its standard errors propagated through the
contractions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Wilsonian",
    "wilsonian",
    "wilsonian_fixed_point",
    "rbf_kernel",
    "rbf_spectrum",
    "rbf_running_ridge",
    "ScaleResolved",
    "scale_resolved",
]

KERNELS = ("nngp", "ntk")


# ----------------------------------------------------------------------------- validation
def _as_array(value, name: str, ndim: int | None = None, shape_text: str = "") -> jax.Array:
    try:
        arr = value if isinstance(value, jax.Array) else np.asarray(value)
    except Exception as err:  # noqa: BLE001 - anything unconvertible is bad input
        raise ValueError(f"{name}: expected an array, got {type(value).__name__}") from err
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {shape_text or f'a {ndim}-D array'}, got {arr.shape}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if not isinstance(arr, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return jnp.asarray(arr)


def _cast(x, dtype):
    """``x`` as ``dtype``: on the host for concrete arrays (no device op to compile), with
    ``astype`` inside a trace."""
    if isinstance(x, jax.core.Tracer):
        return x.astype(dtype)
    return np.asarray(x, dtype=dtype)


def _check_symmetric(k: jax.Array, name: str) -> None:
    if isinstance(k, jax.core.Tracer):
        return
    a = np.asarray(k, dtype=np.float64)
    scale = max(float(np.max(np.abs(a))), np.finfo(np.float64).tiny)
    rtol = 1e-4 if k.dtype == jnp.float32 else 1e-8
    if float(np.max(np.abs(a - a.T))) > rtol * scale:
        raise ValueError(f"{name}: expected a symmetric kernel matrix, got asymmetry above {rtol}")


def _check_ridge(ridge) -> float:
    try:
        r = float(ridge)
    except (TypeError, ValueError):
        raise ValueError(f"ridge: expected a finite number > 0, got {ridge!r}") from None
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"ridge: expected a finite number > 0, got {ridge!r}")
    return r


# ----------------------------------------------------------------------------- the flow
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Wilsonian:
    """The Wilsonian flow of GP regression over a sequence of cutoffs (cutoff axis first).

    ``C`` cutoffs, ``N`` training and ``M`` test inputs, ``P = N + M``; ``...`` is the shape of
    one target (``()`` for ``y [N]``, ``(O,)`` for ``y [N, O]``).

    Attributes:
      cutoffs: ``[C]`` the cutoffs ``Lambda`` on the population eigenvalues: modes with
        ``lambda_k >= Lambda`` are kept, the rest integrated out (to within roundoff: a mode
        within ``P eps lambda_1`` below a cutoff is kept; module docstring, **Ties**).
      n_modes: ``[C]`` number of modes kept (of ``P``).
      ridge: ``[]`` the bare ridge ``sigma^2``.
      running_ridge: ``[C]`` ``sigma^2(Lambda) = sigma^2 + tr(K^>_train) / N``.
      local_ridge: ``[C, N]`` the input-dependent version ``sigma^2 + K^>(x_mu, x_mu)``.
      integrated_sum: ``[C]`` ``sum_{lambda_k < Lambda} lambda_k`` from the estimated spectrum,
        the expectation of ``running_ridge - ridge`` over training draws.
      eigenvalues: ``[P]`` the population eigenvalue estimates ``mu_k / P``, descending.
      train: ``[C, N, ...]`` the effective theory's posterior mean on the training inputs,
        ``K^<_train (K^<_train + sigma^2(Lambda) I)^{-1} y``.
      test: ``[C, M, ...]`` the same on the test inputs, ``K^<_{test,train} (...)^{-1} y``.
      truncated_train: ``[C, N, ...]`` plain truncation: the same kept modes, bare ridge.
      truncated_test: ``[C, M, ...]`` plain truncation on the test inputs.
      exact_test: ``[C, M, ...]`` the exact effective theory (noise matrix
        ``sigma^2 I + K^>``): ``K^<_{test,train} (K_train + sigma^2 I)^{-1} y``.
      full_train: ``[N, ...]`` the full GP posterior mean on the training inputs.
      full_test: ``[M, ...]`` the full GP posterior mean on the test inputs.
    """

    cutoffs: jax.Array
    n_modes: jax.Array
    ridge: jax.Array
    running_ridge: jax.Array
    local_ridge: jax.Array
    integrated_sum: jax.Array
    eigenvalues: jax.Array
    train: jax.Array
    test: jax.Array
    truncated_train: jax.Array
    truncated_test: jax.Array
    exact_test: jax.Array
    full_train: jax.Array
    full_test: jax.Array

    @property
    def valid(self) -> jax.Array:
        """``[C]`` where the running-ridge approximation is justified: every integrated-out
        mode is unlearnable, ``N Lambda <= sigma^2(Lambda)`` (the IR scale the data set), and at
        least ``N`` modes are integrated out (so that ``K^>`` has full rank on the training
        inputs and can act as white noise); ``Lambda = 0`` (nothing integrated out, exact) is
        not flagged."""
        return _valid(self.cutoffs, self.running_ridge, self.n_modes, self.train, self.eigenvalues)

    def test_error(self, which: str = "effective") -> jax.Array:
        """``[C]`` relative distance ``|f - f_full| / |f_full|`` of the test predictions from the
        full GP posterior mean, for ``which`` in ``("effective", "truncated", "exact")``."""
        preds = dict(effective=self.test, truncated=self.truncated_test, exact=self.exact_test)
        if which not in preds:
            raise ValueError(f"which: expected one of {tuple(preds)}, got {which!r}")
        return _relative_error(preds[which], self.full_test)


@jax.jit
def _valid(cutoffs, running_ridge, n_modes, train, eigenvalues):
    n, p = train.shape[1], eigenvalues.shape[0]
    return (cutoffs > 0) & (cutoffs * n <= running_ridge) & (p - n_modes >= n)


@jax.jit
def _relative_error(pred, full):
    diff = (pred - full[None]).reshape(pred.shape[0], -1)
    return jnp.linalg.norm(diff, axis=1) / jnp.linalg.norm(full)


def _log_cutoffs(lam: jax.Array, count: int) -> jax.Array:
    """``count`` cutoffs log-spaced from the largest eigenvalue (keeps the top mode) to the
    smallest one (or ``1e-12`` of the largest), then ``0`` (keeps every mode). The first and
    the last of the grid sit on eigenvalues: :func:`_flow` keeps a mode at a cutoff to within
    roundoff (module docstring, **Ties**)."""
    if count < 1:
        return jnp.zeros((1,), lam.dtype)
    top = lam[0]
    floor = jnp.maximum(lam[-1], 1e-12 * top)
    grid = jnp.exp(jnp.linspace(jnp.log(top), jnp.log(floor), count))
    return jnp.concatenate([grid.at[0].set(top), jnp.zeros((1,), lam.dtype)])


@jax.jit
def _flow(k_tt, k_st, k_ss, y, ridge, cutoffs, use_default):
    n, m = k_tt.shape[0], k_ss.shape[0]
    p = n + m
    joint = jnp.block([[k_tt, k_st.T], [k_st, k_ss]])
    mu, psi = jnp.linalg.eigh(0.5 * (joint + joint.T))
    mu, psi = jnp.maximum(mu[::-1], 0.0), psi[:, ::-1]
    lam = mu / p
    # the default grid is chosen inside (it needs the spectrum) but traced, not static, so
    # that a count and an explicit array of the same length share one compilation
    cutoffs = jnp.where(use_default, _log_cutoffs(lam, cutoffs.shape[0] - 1), cutoffs)
    psi_t, psi_s = psi[:n], psi[n:]
    eye = jnp.eye(n, dtype=k_tt.dtype)
    shape = y.shape[1:]
    y = y.reshape(n, -1)  # [N, O]
    alpha = jnp.linalg.solve(k_tt + ridge * eye, y)
    full_train, full_test = k_tt @ alpha, k_st @ alpha
    diag_t = jnp.diagonal(k_tt)
    proj_alpha = psi_t.T @ alpha  # [P, O]

    # a cutoff within the eigensolver's roundoff of an eigenvalue keeps its mode (**Ties**)
    tie = p * jnp.finfo(lam.dtype).eps * lam[0]

    def one(cut):
        keep = lam >= cut - tie
        w = jnp.where(keep, mu, 0.0)[:, None]  # [P, 1]
        kl_tt = (psi_t * w.T) @ psi_t.T  # K^<_train

        def kept(rows, a):  # K^<_{rows, train} @ a through the modes: O(P N) per column
            return rows @ (w * (psi_t.T @ a))

        local = ridge + jnp.maximum(diag_t - jnp.diagonal(kl_tt), 0.0)
        running = jnp.mean(local)
        a_eff = jnp.linalg.solve(kl_tt + running * eye, y)
        a_tr = jnp.linalg.solve(kl_tt + ridge * eye, y)
        return dict(
            n_modes=jnp.sum(keep).astype(jnp.int32),
            running_ridge=running,
            local_ridge=local,
            integrated_sum=jnp.sum(jnp.where(keep, 0.0, lam)),
            train=kl_tt @ a_eff,
            test=kept(psi_s, a_eff),
            truncated_train=kl_tt @ a_tr,
            truncated_test=kept(psi_s, a_tr),
            exact_test=psi_s @ (w * proj_alpha),
        )

    out = jax.lax.map(one, cutoffs)
    c = cutoffs.shape[0]
    for name in ("train", "test", "truncated_train", "truncated_test", "exact_test"):
        out[name] = out[name].reshape((c, -1, *shape))
    full_train, full_test = full_train.reshape((n, *shape)), full_test.reshape((m, *shape))
    return cutoffs, lam, full_train, full_test, out


def wilsonian(
    k_train,
    k_test_train,
    y,
    *,
    k_test,
    ridge: float,
    cutoffs=None,
) -> Wilsonian:
    """The Wilsonian flow of GP regression: integrate out the kernel modes below each cutoff.

    See the module docstring for the derivation. The modes are the kernel operator's
    eigenfunctions estimated on all ``N + M`` inputs (training and test, drawn from the same
    distribution); modes with population eigenvalue below the cutoff are integrated out and
    renormalize the ridge.

    Args:
      k_train: ``[N, N]`` kernel on the training inputs.
      k_test_train: ``[M, N]`` kernel between test and training inputs.
      y: ``[N]`` or ``[N, O]`` training targets.
      k_test: ``[M, M]`` kernel on the test inputs (needed for the modes; use ``M >= N``).
      ridge: the bare ridge ``sigma^2 > 0``.
      cutoffs: ``[C]`` cutoffs ``Lambda >= 0`` on the population eigenvalues, in any order
        (``0`` keeps every mode; a mode within roundoff, ``P eps lambda_1``, below a cutoff
        is kept), or a count ``C``: ``C`` cutoffs log-spaced from the largest estimated
        eigenvalue (which keeps the top mode) to the smallest (which keeps every mode), then
        ``0`` (default ``12``). Cutoffs on the eigenvalue scale, not on mode counts, do not split
        (near-)degenerate shells of modes.

    Returns:
      A :class:`Wilsonian`; dtype follows the kernels (float64 under ``jax.enable_x64``).

    Example:
      >>> import numpy as np, rgnn
      >>> x = np.random.RandomState(0).randn(60, 2)
      >>> k = rgnn.rbf_kernel(x, x)
      >>> w = rgnn.wilsonian(k[:20, :20], k[20:, :20], x[:20, 0], k_test=k[20:, 20:], ridge=0.1)
      >>> w.running_ridge.shape == w.n_modes.shape
      True
    """
    k_tt = _as_array(k_train, "k_train", 2, "a square [N, N] kernel matrix")
    n = k_tt.shape[0]
    if k_tt.shape != (n, n) or n < 1:
        raise ValueError(f"k_train: expected a square [N, N] kernel matrix, got {k_tt.shape}")
    k_st = _as_array(k_test_train, "k_test_train", 2, f"a [M, {n}] kernel matrix")
    if k_st.shape[1] != n or k_st.shape[0] < 1:
        raise ValueError(f"k_test_train: expected a [M, {n}] kernel matrix, got {k_st.shape}")
    m = k_st.shape[0]
    k_ss = _as_array(k_test, "k_test", 2, f"a square [{m}, {m}] kernel matrix")
    if k_ss.shape != (m, m):
        raise ValueError(f"k_test: expected a square [{m}, {m}] kernel matrix, got {k_ss.shape}")
    _check_symmetric(k_tt, "k_train")
    _check_symmetric(k_ss, "k_test")
    y_arr = _as_array(y, "y")
    if y_arr.ndim not in (1, 2) or y_arr.shape[0] != n:
        raise ValueError(f"y: expected [{n}] or [{n}, O] targets, got shape {y_arr.shape}")
    r = _check_ridge(ridge)
    dtype = jnp.result_type(k_tt.dtype, k_st.dtype, k_ss.dtype, jnp.result_type(float))
    if cutoffs is None:
        cutoffs = 12
    use_default = False
    if isinstance(cutoffs, int) and not isinstance(cutoffs, bool):
        if cutoffs < 1:
            raise ValueError(f"cutoffs: expected a count >= 1 or an array, got {cutoffs}")
        use_default, cut = True, jnp.zeros((cutoffs + 1,), dtype)
    else:
        cut = _as_array(cutoffs, "cutoffs", 1, "a 1-D array of cutoffs")
        if cut.shape[0] < 1:
            raise ValueError("cutoffs: expected at least one cutoff, got an empty array")
        if not isinstance(cut, jax.core.Tracer) and bool(np.any(np.asarray(cut) < 0)):
            raise ValueError("cutoffs: expected cutoffs >= 0 (0 keeps every mode)")
    cut, lam, full_train, full_test, out = _flow(
        _cast(k_tt, dtype),
        _cast(k_st, dtype),
        _cast(k_ss, dtype),
        _cast(y_arr, dtype),
        np.asarray(r, dtype),
        _cast(cut, dtype),
        use_default,
    )
    return Wilsonian(
        cutoffs=cut,
        n_modes=out["n_modes"],
        ridge=jnp.asarray(np.asarray(r, dtype)),
        running_ridge=out["running_ridge"],
        local_ridge=out["local_ridge"],
        integrated_sum=out["integrated_sum"],
        eigenvalues=lam,
        train=out["train"],
        test=out["test"],
        truncated_train=out["truncated_train"],
        truncated_test=out["truncated_test"],
        exact_test=out["exact_test"],
        full_train=full_train,
        full_test=full_test,
    )


def wilsonian_fixed_point(
    fp,
    y,
    *,
    n_train: int,
    ridge: float,
    kernel: str = "nngp",
    layer: int | None = None,
    cutoffs=None,
) -> Wilsonian:
    """:func:`wilsonian` on one layer of a :class:`~rgnn.FixedPoint`.

    Args:
      fp: a fixed point computed on ``x = concatenate([x_train, x_test])`` (``x2=None``).
      y: ``[n_train]`` or ``[n_train, O]`` training targets.
      n_train: the first ``n_train`` rows of ``x`` are the training inputs, the rest test.
      ridge: the bare ridge ``sigma^2 > 0``.
      kernel: ``"nngp"`` (Bayesian posterior of the infinite-width network) or ``"ntk"`` (the
        mean of gradient-descent training to convergence with weight-decay-like ridge).
      layer: 1-based preactivation layer; ``None`` is the output layer ``L + 1``.
      cutoffs: as in :func:`wilsonian`.
    """
    from rgnn.fixed_point import FixedPoint

    if not isinstance(fp, FixedPoint):
        raise ValueError(f"fp: expected an rgnn.FixedPoint, got {type(fp).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    k = getattr(fp, kernel)
    if k.shape[1] != k.shape[2]:
        raise ValueError(f"fp: expected a fixed point on one input set (x2=None), got {k.shape}")
    n_layers, p = k.shape[0], k.shape[1]
    if layer is None:
        layer = n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_layers:
        raise ValueError(f"layer: expected an integer in 1..{n_layers}, got {layer!r}")
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 1 <= n_train < p:
        raise ValueError(f"n_train: expected an integer in 1..{p - 1}, got {n_train!r}")
    kl = k[layer - 1]
    if not isinstance(kl, jax.core.Tracer):
        kl = np.asarray(kl)  # slice on the host: no device op to compile per block shape
    return wilsonian(
        kl[:n_train, :n_train],
        kl[n_train:, :n_train],
        y,
        k_test=kl[n_train:, n_train:],
        ridge=ridge,
        cutoffs=cutoffs,
    )


# ----------------------------------------------------------------------------- Gaussian case
def rbf_kernel(x1, x2=None, *, length_scale: float = 1.0) -> jax.Array:
    """The Gaussian (RBF) kernel ``exp(-|x1_a - x2_b|^2 / (2 l^2))``, ``[N1, N2]``."""
    from rgnn._validate import check_pair

    if not (isinstance(length_scale, int | float) and math.isfinite(length_scale)):
        raise ValueError(f"length_scale: expected a finite number > 0, got {length_scale!r}")
    if length_scale <= 0:
        raise ValueError(f"length_scale: expected a finite number > 0, got {length_scale!r}")
    x1, x2 = check_pair(x1, x2)
    return _rbf(x1, x1 if x2 is None else x2, length_scale)


@jax.jit
def _rbf(x1, x2, length_scale):
    d2 = jnp.sum(x1 * x1, 1)[:, None] + jnp.sum(x2 * x2, 1)[None, :] - 2.0 * x1 @ x2.T
    return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * length_scale**2))


def rbf_spectrum(
    dim: int, *, input_std: float = 1.0, length_scale: float = 1.0, n_degrees: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form spectrum of the RBF kernel under ``x ~ N(0, input_std^2 I_dim)``.

    Returns ``(eigenvalues [n_degrees], degeneracies [n_degrees])``: degree ``j`` has
    eigenvalue ``(2a/A)^{dim/2} B^j`` with multiplicity ``binom(j + dim - 1, dim - 1)``
    (Rasmussen & Williams 2006, eq. 4.41; module docstring). float64 NumPy arrays.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
    for name, v in (("input_std", input_std), ("length_scale", length_scale)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    if isinstance(n_degrees, bool) or not isinstance(n_degrees, int) or n_degrees < 1:
        raise ValueError(f"n_degrees: expected an integer >= 1, got {n_degrees!r}")
    a = 1.0 / (4.0 * input_std**2)
    b = 1.0 / (2.0 * length_scale**2)
    big_a = a + b + math.sqrt(a * a + 2.0 * a * b)
    j = np.arange(n_degrees)
    lam = (2.0 * a / big_a) ** (dim / 2) * (b / big_a) ** j
    deg = np.array([math.comb(int(k) + dim - 1, dim - 1) for k in j], dtype=np.float64)
    return lam, deg


def rbf_running_ridge(
    cutoffs, *, ridge: float, dim: int, input_std: float = 1.0, length_scale: float = 1.0
) -> np.ndarray:
    """The Gaussian-case running ridge in closed form, ``sigma^2 + sum_{lambda_j < Lambda}
    deg_j lambda_j`` (module docstring), for each cutoff; float64 NumPy ``[C]``.

    The sum over degrees is exact up to the truncation at degree 400 (below ``1e-30`` of the
    total for any ``B < 0.85``); the trace of the kernel, ``sum_j deg_j lambda_j = 1``, fixes it.
    """
    r = _check_ridge(ridge)
    cut = np.asarray(cutoffs, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(cut)) or np.any(cut < 0):
        raise ValueError("cutoffs: expected finite cutoffs >= 0")
    lam, deg = rbf_spectrum(
        dim, input_std=input_std, length_scale=length_scale, n_degrees=400 if dim <= 3 else 120
    )
    kept = (lam[None, :] >= cut[:, None]) * (lam * deg)[None, :]
    return r + (1.0 - kept.sum(1))


# ----------------------------------------------------------------------------- scale-resolved
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleResolved:
    """An empirical kernel's departure from the fixed point, resolved over the fixed point's
    eigenmodes in bands of eigenvalue. ``...`` are the leading axes of the empirical kernels
    (networks, steps, ...); ``N`` inputs, ``B`` bands (band 0 holds the largest eigenvalues).

    With ``K_0 = sum_i lambda_i u_i u_i^T`` (descending), ``D = K_emp - K_0``, ``P_b`` the
    projector on band ``b`` and ``Y`` the target (``[N, O]``):

    Attributes:
      eigenvalues: ``[N]`` ``lambda_i`` of the fixed-point kernel, descending.
      band_edges: ``[B + 1]`` descending eigenvalue edges; band ``b`` holds
        ``edges[b] >= lambda > edges[b + 1]``.
      band_modes: ``[B]`` number of modes in each band.
      departure: ``[..., B]`` ``|P_b D|_F / |K_0|_F``: the share of the departure carried by
        band ``b`` (``sum_b departure^2 = total^2``, an exact partition).
      relative_departure: ``[..., B]`` ``|P_b D P_b|_F / |P_b K_0 P_b|_F``: how far band ``b``
        moved relative to its own size (0 for an empty band).
      mode_shift: ``[..., N]`` ``u_i^T D u_i / lambda_i``, the first-order relative change of
        each eigenvalue (``0`` where ``lambda_i`` is numerically zero).
      total: ``[...]`` ``|D|_F / |K_0|_F``.
      target_weight: ``[B]`` ``|P_b Y|_F^2 / |Y|_F^2``: where the target lives (NaN without a
        target).
      alignment: ``[...]`` the Frobenius cosine between ``D`` and ``Y Y^T``, in ``[-1, 1]``:
        how much of the change points along the target (NaN without a target).
      band_alignment: ``[..., B]`` the same cosine within each band, between ``P_b D P_b`` and
        ``P_b Y Y^T P_b`` (NaN without a target or for an empty band).
    """

    eigenvalues: jax.Array
    band_edges: jax.Array
    band_modes: jax.Array
    departure: jax.Array
    relative_departure: jax.Array
    mode_shift: jax.Array
    total: jax.Array
    target_weight: jax.Array
    alignment: jax.Array
    band_alignment: jax.Array

    @property
    def top_fraction(self) -> jax.Array:
        """``[...]`` ``departure[..., 0]^2 / total^2``: the share of the departure (squared)
        carried by the top band."""
        return self.departure[..., 0] ** 2 / self.total**2


def _cosine(a, b):
    """Frobenius cosine of ``a [..., N, N]`` with ``b [N, N]`` (NaN where either is zero)."""
    num = jnp.einsum("...ij,ij->...", a, b)
    den = jnp.linalg.norm(a, axis=(-2, -1)) * jnp.linalg.norm(b)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def _lead(x, like):
    """``x [B]`` reshaped to broadcast against ``like [..., B]`` (the suite forbids implicit
    rank promotion)."""
    return x.reshape((1,) * (like.ndim - 1) + x.shape)


@jax.jit
def _resolve(k0, emp, y, edges, has_target, use_log_edges):
    lam, u = jnp.linalg.eigh(0.5 * (k0 + k0.T))
    lam, u = lam[::-1], u[:, ::-1]
    n = lam.shape[0]
    # default edges (traced, so that jit needs no concrete kernel): log-spaced from the top
    # eigenvalue to the smallest above 1e-12 of it, open at both ends
    top = lam[0]
    floor = jnp.min(jnp.where(lam > 1e-12 * top, lam, top))
    grid = jnp.exp(jnp.linspace(jnp.log(top), jnp.log(floor), edges.shape[0]))
    log_edges = grid.at[0].set(jnp.inf).at[-1].set(-jnp.inf)
    edges = jnp.where(use_log_edges, log_edges, edges)
    # band b holds edges[b] >= lambda > edges[b + 1]; modes outside the edges are in no band
    onehot = ((lam[:, None] <= edges[None, :-1]) & (lam[:, None] > edges[None, 1:])).astype(
        k0.dtype
    )  # [N, B]
    d = emp - k0.reshape((1,) * (emp.ndim - 2) + k0.shape)
    dt = jnp.einsum("ai,...ab,bj->...ij", u, d, u)  # D in the eigenbasis
    k0n = jnp.linalg.norm(k0)
    departure = jnp.sqrt(jnp.sum(dt**2, axis=-1) @ onehot) / k0n
    mask = jnp.einsum("ib,jb->bij", onehot, onehot)  # [B, N, N]: both modes in band b
    block = jnp.einsum("...ij,bij->...b", dt**2, mask)  # |P_b D P_b|^2
    k0_block = onehot.T @ lam**2  # |P_b K_0 P_b|^2
    has = k0_block > 0
    relative = jnp.where(
        _lead(has, block), jnp.sqrt(block / _lead(jnp.where(has, k0_block, 1.0), block)), 0.0
    )
    tiny = jnp.finfo(k0.dtype).eps * n * jnp.max(jnp.abs(lam))
    big = jnp.abs(lam) > tiny
    diag = jnp.diagonal(dt, axis1=-2, axis2=-1)
    mode_shift = jnp.where(_lead(big, diag), diag / _lead(jnp.where(big, lam, 1.0), diag), 0.0)
    total = jnp.linalg.norm(d, axis=(-2, -1)) / k0n
    yt = u.T @ y  # [N, O]
    yy = yt @ yt.T  # Y Y^T in the eigenbasis
    weight = onehot.T @ jnp.sum(yt**2, axis=1) / jnp.sum(yt**2)
    alignment = _cosine(dt, yy)
    num = jnp.einsum("...ij,bij,ij->...b", dt, mask, yy)
    d_norm = jnp.sqrt(block)  # |P_b D P_b|
    y_norm = jnp.sqrt(jnp.einsum("bij,ij->b", mask, yy**2))  # |P_b Y Y^T P_b|
    den = d_norm * _lead(y_norm, d_norm)
    nan = jnp.asarray(jnp.nan, k0.dtype)
    band_alignment = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), nan)
    weight = jnp.where(has_target, weight, nan)
    alignment = jnp.where(has_target, alignment, nan)
    band_alignment = jnp.where(has_target, band_alignment, nan)
    counts = jnp.sum(onehot, axis=0).astype(jnp.int32)
    return (
        lam,
        edges,
        counts,
        departure,
        relative,
        mode_shift,
        total,
        weight,
        alignment,
        band_alignment,
    )


def scale_resolved(fixed_kernel, empirical, *, bands=4, target=None) -> ScaleResolved:
    """Decompose empirical kernels' departure from the fixed point over its eigenmodes.

    Which scales of the fixed point moved, how much, and whether the change points along the
    target (:class:`ScaleResolved` gives every formula). The fixed-point eigenbasis orders the
    function space by scale: the top modes are the smooth, large-variance directions a network
    learns first; a lazy (NTK-regime) network's departure is small and spread over all bands
    (its initialization fluctuations, ``O(1/sqrt(width))``), a feature-learning network's is
    concentrated in the top bands and aligned with the target.

    Args:
      fixed_kernel: ``[N, N]`` the fixed-point kernel ``K_0`` (e.g. ``fp.ntk[l - 1]``).
      empirical: ``[..., N, N]`` empirical kernels of the same kind on the same inputs (one
        network, an ensemble, a training record, ...).
      bands: the number of bands ``B`` (edges log-spaced from the largest eigenvalue to the
        smallest one above ``1e-12`` of it, the first band open above and the last open
        below), or a descending sequence of ``B + 1`` eigenvalue edges (modes outside them
        belong to no band).
      target: optional ``[N]`` or ``[N, O]`` targets for the alignment fields.

    Returns:
      A :class:`ScaleResolved`; dtype follows the kernels. Jit-able (with ``bands`` and the
      presence of ``target`` static).
    """
    k0 = _as_array(fixed_kernel, "fixed_kernel", 2, "a square [N, N] kernel matrix")
    n = k0.shape[0]
    if k0.shape != (n, n) or n < 2:
        raise ValueError(f"fixed_kernel: expected a square [N, N] kernel, N >= 2, got {k0.shape}")
    _check_symmetric(k0, "fixed_kernel")
    emp = _as_array(empirical, "empirical")
    if emp.ndim < 2 or emp.shape[-2:] != (n, n):
        raise ValueError(f"empirical: expected [..., {n}, {n}] kernels, got shape {emp.shape}")
    dtype = jnp.result_type(k0.dtype, emp.dtype, jnp.result_type(float))
    k0, emp = _cast(k0, dtype), _cast(emp, dtype)
    has_target = target is not None
    if has_target:
        y = _as_array(target, "target")
        if y.ndim not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"target: expected [{n}] or [{n}, O] targets, got shape {y.shape}")
        y = _cast(y.reshape(n, -1), dtype)
        if not isinstance(y, jax.core.Tracer) and not bool(np.any(np.asarray(y) != 0)):
            raise ValueError("target: expected a non-zero target")
    else:
        y = np.ones((n, 1), dtype)
    if isinstance(bands, bool):
        raise ValueError(f"bands: expected an integer >= 1 or descending edges, got {bands!r}")
    if isinstance(bands, int):
        if bands < 1:
            raise ValueError(f"bands: expected an integer >= 1, got {bands}")
        if not isinstance(k0, jax.core.Tracer):
            if np.linalg.eigvalsh(np.asarray(k0, np.float64))[-1] <= 0:
                raise ValueError("fixed_kernel: expected a kernel with a positive eigenvalue")
        edges, use_log = np.zeros(bands + 1), True
    else:
        edges, use_log = np.asarray(bands, dtype=np.float64).reshape(-1), False
        if edges.shape[0] < 2 or np.any(np.isnan(edges)) or np.any(np.diff(edges) >= 0):
            raise ValueError(
                "bands: expected an integer >= 1 or a strictly descending sequence of >= 2 "
                f"eigenvalue edges, got {bands!r}"
            )
    out = _resolve(k0, emp, y, np.asarray(edges, dtype), has_target, use_log)
    lam_j, edges_j, counts, dep, rel, shift, total, weight, align, band_align = out
    return ScaleResolved(
        eigenvalues=lam_j,
        band_edges=edges_j,
        band_modes=counts,
        departure=dep,
        relative_departure=rel,
        mode_shift=shift,
        total=total,
        target_weight=weight,
        alignment=align,
        band_alignment=band_align,
    )
