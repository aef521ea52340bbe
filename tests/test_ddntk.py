"""The ddNTK means R, S, T, U (PDLT ch. infinity): internal consistency with the verified dNTK
correlators, exact cases, symmetries, bad input, and the 1/n coefficient against Monte Carlo
over finite networks."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn.fixed_point import fixed_point
from rgnn.flow.engine import flow
from rgnn.flow.moments import rules
from tests.test_perturbative import _inputs
from tests.tolerances import EXACT, tol

FIELDS = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")


def _quiet(arch, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rgnn.perturbative(arch, x, ddntk=True, **kw)


def _pair_flow(arch, x, pointwise=False):
    """All eight recursion outputs ``(P, Q, P^, Q^, R, S, T, U)`` on the pairs of ``x``, from
    the flow engine (the Hessian-form correlators ``P^, Q^`` are internal statistics)."""
    fp = fixed_point(arch, x)
    rows, cols = np.triu_indices(x.shape[0], 1)
    sets = np.stack([rows, cols], axis=1)
    ks = fp.nngp[:, sets[:, :, None], sets[:, None, :]]
    ts = fp.ntk[:, sets[:, :, None], sets[:, None, :]]
    lam_w = jnp.asarray(arch.recursion(x.shape[1]).lambda_w[1:], x.dtype)
    dims = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    ratios = jnp.asarray(dims[1:] / dims[:-1], x.dtype)
    inv = jnp.asarray(1 / dims[:-1], x.dtype)
    names = ("P", "Q", "PH", "QH", "R", "S", "T", "U")
    out, _ = flow(
        arch.act,
        arch.weight_var,
        lam_w,
        ratios,
        inv,
        ks,
        ts,
        rules(48, 192, 16, x.dtype),
        stats=names,
        pointwise=pointwise,
    )
    return [np.asarray(out[n]) for n in names]


GELU = dict(activation="gelu", weight_var=1.7, bias_var=0.1)


@pytest.mark.parametrize(
    "cfg",
    [GELU, dict(activation="tanh", weight_var=1.3, bias_var=0.2, parameterization="standard")],
)
def test_hessian_form_correlators_rebuild_p_and_q(x64, cfg):
    """The ddNTK recursions carry the correlators of the Hessian-form dNTK
    ``dH^_{j0;j1j2} = Hess(z_{j0})[g_{j1}, g_{j2}]`` with one preactivation (``P^, Q^``); the dNTK
    is ``dH_{0;12} = dH^_{1;02} + dH^_{2;01}``, so ``P_{0123} = Q^_{1203} + Q^_{2103}`` and
    ``Q_{0123} = Q^_{1023} + P^_{2013}``: a separate derivation reproduces the Monte-Carlo-checked
    ``P, Q`` to roundoff on all 16 components of every pair, mixed widths included."""
    arch = rgnn.MLP(3, (40, 90, 60), **cfg)
    x = _inputs(3, dim=5)  # the shapes of test_symmetries_and_layout: one compilation for gelu
    p, q, ph, qh = _pair_flow(arch, x)[:4]
    p2 = np.einsum("...bcad->...abcd", qh) + np.einsum("...cbad->...abcd", qh)
    q2 = np.einsum("...bacd->...abcd", qh) + np.einsum("...cabd->...abcd", ph)
    scale = np.abs(p).max()
    np.testing.assert_allclose(p2, p, rtol=0, atol=EXACT[x.dtype]["rtol"] * scale)
    np.testing.assert_allclose(q2, q, rtol=0, atol=EXACT[x.dtype]["rtol"] * np.abs(q).max())


def test_symmetries_and_layout(x64):
    """From the definitions: ``R_{0123} = R_{0132}``, ``S_{1234} = S_{2143}``,
    ``T_{1342} = T_{2431}``, ``U_{1423} = U_{2314}``; the single-input values sit on the
    diagonal, the lower triangle is the upper one with the slots swapped; layer 1 is zero; a
    prediction is a pure 1/n coefficient (independent of a common width)."""
    x = _inputs(3, dim=5)
    arch = rgnn.MLP(3, 64, **GELU)
    p = _quiet(arch, x)
    qerr = p.quadrature_error
    r, s, t, u = (np.asarray(getattr(p, f)) for f in FIELDS)
    ex = tol(EXACT, x.dtype)
    np.testing.assert_allclose(r, np.swapaxes(r, -1, -2), **ex)
    np.testing.assert_allclose(s, np.einsum("...abcd->...badc", s), **ex)
    # T_{1342} stored as t[1, 3, 4, 2]: the swap (1 <-> 2, 3 <-> 4) maps it to t[2, 4, 3, 1]
    np.testing.assert_allclose(t, np.einsum("...abcd->...dcba", t), **ex)
    # U_{1423} stored as u[1, 4, 2, 3]: maps to u[2, 3, 1, 4]
    np.testing.assert_allclose(u, np.einsum("...abcd->...cdab", u), **ex)
    for f in (r, s, t, u):
        assert np.all(f[0] == 0)
        assert np.abs(f[1:]).max() > 0
        np.testing.assert_allclose(f[:, 1, 0], np.flip(f[:, 0, 1], axis=(1, 2, 3, 4)), **ex)
        # a pair's components on one input are that input's single-input value (pair engine
        # at the base order against the single-input engine at 4x the order: quadrature error)
        near = dict(rtol=0, atol=qerr * np.abs(f).max())
        np.testing.assert_allclose(f[:, 0, 1, 0, 0, 0, 0], f[:, 0, 0, 0, 0, 0, 0], **near)
        np.testing.assert_allclose(f[:, 0, 1, 1, 1, 1, 1], f[:, 1, 1, 0, 0, 0, 0], **near)
    assert 0 < qerr < 1e-3
    wide = _quiet(rgnn.MLP(3, 512, **GELU), x)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(wide, name), getattr(p, name), **ex)


def _assert_no_second_derivative_terms(p):
    """sigma'' = sigma''' = 0 removes every source of ``R`` and ``U`` (and of ``P^``): they
    vanish exactly on every layer and pair, while ``S`` and ``T`` do not (positive on one
    input)."""
    assert np.all(np.asarray(p.ddntk_r) == 0) and np.all(np.asarray(p.ddntk_u) == 0)
    for name in ("ddntk_s", "ddntk_t"):
        single = np.diagonal(np.asarray(getattr(p, name))[1:, ..., 0, 0, 0, 0], axis1=1, axis2=2)
        assert np.all(single > 0)


def test_linear_ddntk_exact(x64):
    """A deep linear network (no second or third derivative of the activation) has
    ``R = U = 0`` exactly on every layer and pair; on one input of a linear network
    the recursions reduce to ``S' = lam C_W (Theta^2 + r B) + r C_W^2 S`` and
    ``T' = lam^2 (K Theta + r F) + 2 r lam C_W Q^ + r C_W^2 T`` with
    ``Q^' = lam C_W (K Theta + r F) + r C_W^2 Q^``, ``F' = C_W^2 (K Theta + r F)``,
    ``B' = C_W^2 (Theta^2 + r B)`` (``r = n_l / n_{l-1}``)."""
    x = _inputs(2, dim=5)
    cw, cb, widths = 1.3, 0.2, (20, 35, 50)
    lin = _quiet(rgnn.MLP(3, widths, "linear", weight_var=cw, bias_var=cb), x)
    _assert_no_second_derivative_terms(lin)
    dims = (5,) + widths
    for a in range(2):
        k = np.asarray(lin.nngp)[:, a, a]
        th = np.asarray(lin.ntk)[:, a, a]
        f = b = qh = s = t = 0.0
        want_s, want_t = [0.0], [0.0]
        for layer in range(len(widths)):
            r, lam = dims[layer + 1] / dims[layer], cw  # NTK parameterization: lambda_W = C_W
            kt, tt = k[layer] * th[layer], th[layer] ** 2
            s = lam * cw * (tt + r * b) + r * cw * cw * s
            t = lam * lam * (kt + r * f) + 2 * r * lam * cw * qh + r * cw * cw * t
            qh = lam * cw * (kt + r * f) + r * cw * cw * qh
            f, b = cw * cw * (kt + r * f), cw * cw * (tt + r * b)
            want_s.append(s)
            want_t.append(t)
        got = [np.asarray(getattr(lin, n))[:, a, a, 0, 0, 0, 0] for n in ("ddntk_s", "ddntk_t")]
        np.testing.assert_allclose(got[0], want_s, **tol(EXACT, x.dtype))
        np.testing.assert_allclose(got[1], want_t, **tol(EXACT, x.dtype))


def test_bad_input_and_pointwise_relu():
    x = _inputs(2, dim=5)
    arch = rgnn.MLP(3, 32, "relu", weight_var=2.0)
    with pytest.raises(ValueError, match="ddntk"):
        rgnn.perturbative(arch, x, ddntk="yes")
    with pytest.raises(ValueError, match="kinks"):
        rgnn.perturbative(arch, x, ddntk=True)  # relu's distributional ddNTK does not exist
    p = rgnn.perturbative(arch, x, ddntk=True, kinks="pointwise", warn=False)
    assert p.dntk_p is not None  # ddntk implies dntk
    _assert_no_second_derivative_terms(p)  # the pointwise ddNTK of relu: sigma'' = 0
    assert rgnn.perturbative(arch, x, warn=False).ddntk_r is None
