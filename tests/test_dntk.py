"""The dNTK correlators P and Q (PDLT ch. 11): exact cases, internal consistency, the smooth
limit of the kinks, and the 1/n coefficient against Monte Carlo over finite networks."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from tests.test_perturbative import _inputs, _intercept
from tests.tiers import tiered
from tests.tolerances import EXACT, MC_SIGMAS, tol


def _quiet(arch, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rgnn.perturbative(arch, x, dntk=True, **kw)


def test_deep_linear_dntk_is_exact(x64):
    """Deep linear network, one input, mixed widths, with biases: sigma'' = 0 and
    <d(z)> = 1 reduce the recursions to F' = C_W^2 K Theta + r C_W^2 F,
    P' = 2 lam_W C_W K Theta + r (2 lam_W C_W F + C_W^2 P),
    Q' = lam_W C_W K Theta + r (lam_W C_W F + C_W^2 Q) (r = n_l / n_{l-1}); the exact
    (scale-invariant) engine and the quadrature engine (the same network as a plain callable)
    both reproduce them."""
    cw, cb, widths = 1.3, 0.2, (20, 35, 50, 80)
    x = _inputs(2, dim=5)
    for act in ("linear", lambda z: 1.0 * z):
        arch = rgnn.MLP(len(widths), widths, act, weight_var=cw, bias_var=cb)
        p = _quiet(arch, x)
        for a in range(2):
            k = np.asarray(p.nngp)[:, a, a]
            t = np.asarray(p.ntk)[:, a, a]
            dims = (5,) + widths
            f = pp = qq = 0.0
            want_p, want_q = [0.0], [0.0]
            for layer in range(len(widths)):
                r = dims[layer + 1] / dims[layer]
                lam = cw  # NTK parameterization: lambda_W = C_W
                f, pp, qq = (
                    cw * cw * k[layer] * t[layer] + r * cw * cw * f,
                    2 * lam * cw * k[layer] * t[layer] + r * (2 * lam * cw * f + cw * cw * pp),
                    lam * cw * k[layer] * t[layer] + r * (lam * cw * f + cw * cw * qq),
                )
                want_p.append(pp)
                want_q.append(qq)
            got_p = np.asarray(p.dntk_p)[:, a, a]
            got_q = np.asarray(p.dntk_q)[:, a, a]
            np.testing.assert_allclose(got_p[..., 0, 0, 0, 0], want_p, **tol(EXACT, x.dtype))
            np.testing.assert_allclose(got_q[..., 0, 0, 0, 0], want_q, **tol(EXACT, x.dtype))


def test_linear_pairs_exact_engine_equals_quadrature(x64):
    """On pairs of distinct inputs the scale-invariant engine (polar integrals, integration by
    parts) and the quadrature engine (product rule on the grid) are two codes for the same
    expectations: for a linear network they agree to roundoff on all 16 components."""
    x = _inputs(3, dim=5)
    exact = _quiet(rgnn.MLP(3, 40, "linear", weight_var=1.2, bias_var=0.1), x)
    quad = _quiet(rgnn.MLP(3, 40, lambda z: 1.0 * z, weight_var=1.2, bias_var=0.1), x)
    for f in ("dntk_p", "dntk_q"):
        np.testing.assert_allclose(getattr(exact, f), getattr(quad, f), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_pair_layout_symmetries(x64, act):
    """The pair components that involve one input equal the single-input value (computed by the
    separate single-input recursion), P is symmetric under a1 <-> a2 (the NTK is symmetric;
    Q is not: its a1 <-> a2 partner is the third term of the correlator), and the entry
    (b, a) is the entry (a, b) with the slots swapped."""
    x = _inputs(3)
    p = _quiet(rgnn.MLP(3, 64, act, weight_var=2.0 if act == "relu" else 1.5, bias_var=0.1), x)
    qerr = p.quadrature_error
    for f in ("dntk_p", "dntk_q"):
        v = np.asarray(getattr(p, f))
        scale = np.abs(v).max()
        for a in range(3):
            for b in range(3):
                np.testing.assert_allclose(
                    v[:, a, b, 0, 0, 0, 0], v[:, a, a, 0, 0, 0, 0], atol=1e-9 + 2 * qerr * scale
                )
                np.testing.assert_allclose(
                    v[:, a, b, 1, 1, 1, 1], v[:, b, b, 0, 0, 0, 0], atol=1e-9 + 2 * qerr * scale
                )
                np.testing.assert_allclose(v[:, b, a], np.flip(v[:, a, b], axis=(1, 2, 3, 4)))
                if f == "dntk_p":
                    np.testing.assert_allclose(
                        v[:, a, b], np.swapaxes(v[:, a, b], 2, 3), rtol=1e-12, atol=1e-12
                    )
    assert np.abs(np.asarray(p.dntk_p)[-1]).max() > 0


def test_kinks_are_the_smooth_limit(x64):
    """For relu / leaky relu the distributional dNTK (sigma'' = (1 - a) delta) is the limit of
    the smooth activations a z + (1 - a) softplus(beta z) / beta integrated by quadrature: the
    distance shrinks like 1/beta (x2 in beta gives at least x1.5 closer, within 2% at beta = 20;
    measured for leaky relu: 3.273% at beta = 10, 1.735% at 20, 1.177% at 30), while the
    pointwise derivative (sigma'' = 0) stays away. Leaky relu (a = 0.2) exercises the general
    kink coefficient (1 - a^(k+1)) / (k+1).

    Orders: softplus(beta z) has its nearest complex poles at distance pi / beta, so the
    trapezoid rule's error falls like exp(-2 pi (pi / beta) / h) with h = 18 sqrt(K) / order
    its spacing in z: 150 nodes at beta = 10 and 300 at beta = 20 put it below 3e-4 of the
    moments for K up to 4, two orders of magnitude under the percent-level gaps measured here
    (400 nodes at beta = 20 give the same gap to four digits, 1.7352%)."""
    slope = 0.2
    x = _inputs(2)
    cw = 2 / (1 + slope**2)
    arch = rgnn.MLP(2, 64, rgnn.leaky_relu(slope), weight_var=cw, bias_var=0.0)
    dist = _quiet(arch, x, ntk=False)
    point = _quiet(arch, x, ntk=False, kinks="pointwise")
    gaps = []
    for beta, order in ((10.0, 150), (20.0, 300)):

        def smooth(z, beta=beta):
            return slope * z + (1 - slope) * jax.nn.softplus(beta * z) / beta

        s = rgnn.perturbative(
            rgnn.MLP(2, 64, smooth, weight_var=cw, bias_var=0.0),
            x[:2],
            dntk=True,
            ntk=False,
            quadrature_order=order,
            warn=False,
        )
        ref = np.concatenate([np.ravel(s.dntk_p[:, 0, 1]), np.ravel(s.dntk_q[:, 0, 1])])
        got = np.concatenate([np.ravel(dist.dntk_p[:, 0, 1]), np.ravel(dist.dntk_q[:, 0, 1])])
        pw = np.concatenate([np.ravel(point.dntk_p[:, 0, 1]), np.ravel(point.dntk_q[:, 0, 1])])
        scale = np.abs(ref).max()
        gaps.append(np.abs(got - ref).max() / scale)
        assert np.abs(pw - ref).max() / scale > 0.05
    assert gaps[1] < gaps[0] / 1.5 and gaps[1] < 0.02, gaps


def test_bad_input():
    arch = rgnn.MLP(2, 16, "tanh")
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="kinks"):
        rgnn.perturbative(arch, x, dntk=True, kinks="smooth")
    with pytest.raises(ValueError, match="dntk"):
        rgnn.perturbative(arch, x, dntk="yes")


DNTK_WIDTHS = (16, 32, 64, 128)
DNTK_CASES = {
    # gelu with a bias: no parity kills a term; relu through autodiff is the pointwise dNTK.
    # (The ddNTK means R, S, T, U are checked against Monte Carlo on three distinct inputs by
    # tests/test_full_fields.py, whose fields restricted to pairs equal this pair layout
    # exactly: measuring them here again cost two thirds of this file's time.)
    "gelu-bias": (dict(activation="gelu", weight_var=1.7, bias_var=0.1), "distributional"),
    "relu-pointwise": (dict(activation="relu", weight_var=2.0), "pointwise"),
}


# relu-pointwise in the slow tier: the pointwise relu dNTK stays in the default run through
# tests/test_full_fields.py's Monte Carlo check on three and four inputs
@pytest.mark.parametrize("name", tiered(DNTK_CASES, ("relu-pointwise",)))
def test_dntk_correlators_match_monte_carlo(name):
    """n_{l-1} E[dH z] over finite networks (dNTK by automatic differentiation: a
    Jacobian-vector product of the empirical NTK along the gradient of one output), extrapolated
    by the weighted fit a + b/n over 4 widths, equals P and Q on all 16 components of a pair of
    inputs, on the last hidden layer (sources only) and the output layer (which also propagates
    F, B, P and Q), within MC_SIGMAS standard errors of the fit plus the quadrature error
    (power: fit SE < 35% of the largest component)."""
    cfg, kinks = DNTK_CASES[name]
    x = _inputs(2)
    runs = []
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, n in enumerate(DNTK_WIDTHS):
            arch = rgnn.MLP(2, n, out_dim=3, **cfg)
            pred = rgnn.perturbative(arch, x, dntk=True, kinks=kinks, ntk=False)
            meas = rgnn.measure(
                arch,
                x,
                n_networks=1000,
                key=jax.random.key(31 + i),
                ntk=False,
                dntk=True,
            )
            runs.append((pred, meas))
    ns = np.array(DNTK_WIDTHS, float)
    fields = ("dntk_p", "dntk_q")
    for field in fields:
        for layer in (-2, -1):
            pred = np.asarray(getattr(runs[0][0], field))[layer, 0, 1]
            for p, _ in runs[1:]:  # a pure 1/n prediction: n E[dH z] does not depend on n
                np.testing.assert_allclose(getattr(p, field)[layer, 0, 1], pred, rtol=1e-10)
            qerr = max(p.quadrature_error for p, _ in runs) * np.abs(pred).max()
            big = np.unravel_index(np.argmax(np.abs(pred)), pred.shape)
            for comp in np.ndindex(2, 2, 2, 2):
                y = [float(getattr(m, field)[(layer, 0, 1) + comp]) for _, m in runs]
                se = [float(getattr(m, field + "_se")[(layer, 0, 1) + comp]) for _, m in runs]
                a, a_se = _intercept(ns, y, se)
                assert abs(a - pred[comp]) <= MC_SIGMAS * a_se + qerr, (
                    field,
                    layer,
                    comp,
                    a,
                    a_se,
                    pred[comp],
                )
                if comp == big:
                    assert a_se < 0.35 * abs(pred[comp]), (field, layer, a_se, pred[comp])
