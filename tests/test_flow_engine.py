"""The flow engine (rgnn.flow): exact full-layout results, the layouts' agreement, and the JAX
invariants that keep it fast (one compilation whatever the depth, none on a second call)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn.flow.engine import flow
from rgnn.flow.moments import rules
from tests.test_perturbative import _inputs
from tests.tolerances import EXACT, tol


def test_deep_linear_full_vertex_is_exact_on_distinct_inputs(x64):
    """Deep linear network (C_W = 1, C_b = 0): K^(l) = K for every layer and
    V^(l)_(a1 a2)(a3 a4) = (l - 1)(K_a1a3 K_a2a4 + K_a1a4 K_a2a3) on every index tuple, four
    different inputs included (PDLT sec. 3.3), with no mean-kernel correction; the 3- and
    4-input Gauss-Hermite rule is exact for these polynomials."""
    x = _inputs(5, dim=7)
    arch = rgnn.MLP(4, 40, "linear", weight_var=1.0, bias_var=0.0)
    p = rgnn.perturbative(arch, x, full=True, ntk=False, warn=False)
    k = np.asarray(p.nngp[0])
    np.testing.assert_allclose(np.asarray(p.nngp), np.broadcast_to(k, p.nngp.shape), rtol=1e-13)
    layers = np.arange(arch.n_layers)[:, None, None, None, None]
    expected = layers * (np.einsum("ac,bd->abcd", k, k) + np.einsum("ad,bc->abcd", k, k))[None]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(p.vertex, expected, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(p.nngp_correction, 0, atol=1e-12 * scale)
    assert p.quadrature_error < 1e-10


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_full_layout_on_two_inputs_is_the_pair_layout(x64, name):
    """On two inputs the full fields hold the pair layout's numbers: the same computation."""
    x = _inputs(2)
    arch = rgnn.MLP(3, 64, name, weight_var=2.0 if name == "relu" else 1.5, bias_var=0.1)
    kw = dict(ddntk=True, kinks="pointwise", warn=False)
    f = rgnn.perturbative(arch, x, full=True, **kw)
    p = rgnn.perturbative(arch, x, **kw)
    t = tol(EXACT, jnp.float64)
    comps = [(0, 0), (0, 1), (1, 1)]
    for name4 in ("vertex", "ntk_vertex", "mixed_vertex"):
        full = np.asarray(getattr(f, name4))
        pair = np.asarray(getattr(p, name4))[:, 0, 1]
        for i, (a, b) in enumerate(comps):
            for j, (c, d) in enumerate(comps):
                np.testing.assert_allclose(full[:, a, b, c, d], pair[:, i, j], **t)
    b = np.asarray(f.ntk_b)
    np.testing.assert_allclose(b[:, 0, 0, 1, 1], p.ntk_b[:, 0, 1, 0], **t)
    np.testing.assert_allclose(b[:, 0, 1, 1, 0], p.ntk_b[:, 0, 1, 1], **t)
    for name4 in ("dntk_p", "dntk_q", "ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"):
        np.testing.assert_allclose(getattr(f, name4), np.asarray(getattr(p, name4))[:, 0, 1], **t)
    for name2 in ("nngp_correction", "ntk_correction", "nngp_variance", "ntk_variance"):
        np.testing.assert_allclose(getattr(f, name2), getattr(p, name2), **t)


def _flow_args(depth, n=3):
    x = jnp.asarray(_inputs(n))
    arch = rgnn.MLP(depth, 64, "gelu", weight_var=1.5, bias_var=0.1)
    fp = rgnn.fixed_point(arch, x)
    sets = np.array([[0, 1], [0, 2], [1, 2]])
    ks = fp.nngp[:, sets[:, :, None], sets[:, None, :]]
    ts = fp.ntk[:, sets[:, :, None], sets[:, None, :]]
    one = jnp.ones(depth, x.dtype)
    return (arch.act, 1.5, one, one, one / 64, ks, ts, rules(16, 32, 8, x.dtype))


def test_compilation_does_not_grow_with_depth(x64):
    """One scan over layers: the traced program of depth 10 is the one of depth 2."""
    sizes = []
    for depth in (2, 10):
        act, *args = _flow_args(depth)
        jaxpr = jax.make_jaxpr(lambda *a, act=act: flow(act, *a, stats=("P", "Q")))(*args)
        sizes.append(len(str(jaxpr).splitlines()))
    assert sizes[0] == sizes[1]


def test_second_call_does_not_recompile(x64):
    """The same shapes reuse the compilation; so does the half-spacing-shifted rule of the
    error estimate (only the nodes change, not their number)."""
    x = _inputs(3)
    arch = rgnn.MLP(2, 64, "tanh", weight_var=1.2, bias_var=0.1)
    rgnn.perturbative(arch, x, dntk=True, warn=False)
    before = flow._cache_size()
    rgnn.perturbative(arch, x + 0.1, dntk=True, warn=False)
    assert flow._cache_size() == before


def test_bad_input(x64):
    x = _inputs(3)
    arch = rgnn.MLP(2, 64, "tanh")
    with pytest.raises(ValueError, match="full"):
        rgnn.perturbative(arch, x, full="yes")
    with pytest.raises(ValueError, match="memory_limit"):
        rgnn.perturbative(arch, x, memory_limit=-1)
    with pytest.raises(ValueError, match="x: 3 inputs .* memory_limit"):
        rgnn.perturbative(arch, x, full=True, memory_limit=1000)
    with pytest.raises(ValueError, match="x: 400 inputs"):  # refused before allocating
        rgnn.perturbative(arch, np.ones((400, 3)), full=True)
    relu = rgnn.MLP(2, 64, "relu", weight_var=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="kinks"):
            rgnn.perturbative(relu, x, full=True, dntk=True)
