"""Criticality (PDLT ch. 5): exact critical points, independent quadrature, phases, bad input.

Every susceptibility is checked against an independent reference: the exact values of the
scale-invariant and K*=0 classes, the closed-form GELU root ``K* = (3 + sqrt 17) / 2``, and a
NumPy Gauss-Hermite rule of 1000 nodes (scipy's nodes, NumPy arithmetic, no JAX) for the
rest. At 1000 nodes that rule is converged to ~1e-15 for every integrand used here: for SWISH
at ``K = 14.32``, the hardest case (poles at distance ``pi / sqrt K`` from the real axis),
800 and 3200 nodes agree with adaptive ``scipy.integrate.quad`` to 1e-14.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from rgnn.activations import get_activation, leaky_relu
from rgnn.criticality import UNIVERSALITY_CLASSES, Criticality, critical_point, criticality
from tests.tolerances import EXACT, QUADRATURE, tol

F64 = jnp.dtype("float64")

# Central difference of the recursion map with step h = 1e-5 K*: truncation h^2 |f'''| / 6
# ~ 1e-11 (|f'''| < 1 for these maps) plus roundoff eps K* / h ~ 2e-11: 1e-8 is that with a
# wide margin, and far below the distance of any tested chi_parallel from chi_perp.
FD_ATOL = 1e-8


# ---------------------------------------------------------------------------------------------
# Independent NumPy references


def _phi(x):
    return np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


NUMPY_ACTS = {
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "erf": (scipy.special.erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-x * x)),
    "sin": (np.sin, np.cos),
    "gelu": (lambda x: x * scipy.special.ndtr(x), lambda x: scipy.special.ndtr(x) + x * _phi(x)),
    "swish": (
        lambda x: x * scipy.special.expit(x),
        lambda x: scipy.special.expit(x) * (1 + x * scipy.special.expit(-x)),
    ),
}
NUMPY_ACTS["silu"] = NUMPY_ACTS["swish"]


def _gh_mean(fun, k, n=1000):
    """``E[fun(z)]``, ``z ~ N(0, k)``, by the ``n``-node probabilists' Gauss-Hermite rule."""
    x, w = scipy.special.roots_hermitenorm(n)
    w = w / w.sum()
    return float(np.sum(w * fun(np.sqrt(k) * x)))


def _reference(name, cw, cb, k):
    """``(f(K) = C_b + C_W <s^2>_K, chi_parallel, chi_perp)`` by NumPy quadrature."""
    s, ds = NUMPY_ACTS[name]
    fk = cb + cw * _gh_mean(lambda z: s(z) ** 2, k)
    chi_par = cw * _gh_mean(lambda z: s(z) ** 2 * (z * z - k), k) / (2 * k * k)
    chi_perp = cw * _gh_mean(lambda z: ds(z) ** 2, k)
    return fk, chi_par, chi_perp


@pytest.fixture(scope="module")
def critical():
    """``critical_point`` of every activation with one, computed once in float64."""
    with jax.enable_x64(True):
        return {
            name: critical_point(name)
            for name in (
                "relu",
                "leaky_relu",
                "linear",
                "tanh",
                "erf",
                "sin",
                "gelu",
                "swish",
                "silu",
            )
        }


# ---------------------------------------------------------------------------------------------
# Scale-invariant class


@pytest.mark.parametrize(
    "activation, a2",
    [
        ("relu", 0.5),
        ("leaky_relu", (1 + 0.01**2) / 2),
        (leaky_relu(0.2), (1 + 0.2**2) / 2),
        ("linear", 1.0),
        (lambda x: jnp.where(x > 0, 3.0 * x, 0.5 * x), (9.0 + 0.25) / 2),
    ],
)
def test_scale_invariant_critical_point(x64, activation, a2):
    """C_b = 0, C_W = 1/A_2 exactly; every K is a fixed point; chi = 1 for every K."""
    c = critical_point(activation)
    assert c.universality_class == "scale-invariant"
    assert c.bias_var == 0.0
    np.testing.assert_allclose(c.weight_var, 1.0 / a2, **tol(EXACT, F64))
    assert c.every_k_fixed and math.isnan(c.fixed_point)
    np.testing.assert_allclose([c.chi_parallel, c.chi_perp], 1.0, **tol(EXACT, F64))
    assert c.is_critical and c.phase == "critical"
    again = criticality(activation, c.weight_var, 0.0)
    assert again.every_k_fixed and again.is_critical


def test_scale_invariant_off_critical(x64):
    """relu: K* = C_b / (1 - C_W/2) for C_W < 2; unbounded growth for C_W > 2."""
    c = criticality("relu", 1.0, 0.1)
    np.testing.assert_allclose(c.fixed_point, 0.2, **tol(EXACT, F64))
    assert (c.chi_parallel, c.chi_perp, c.phase, c.stability) == (0.5, 0.5, "ordered", "stable")
    assert not c.is_critical
    c = criticality("relu", 3.0, 0.1)
    assert math.isinf(c.fixed_point) and c.stability == "none"
    assert (c.chi_perp, c.phase) == (1.5, "chaotic")
    assert "without bound" in c.note


# ---------------------------------------------------------------------------------------------
# K* = 0 class


@pytest.mark.parametrize("name, cw", [("tanh", 1.0), ("erf", math.pi / 4), ("sin", 1.0)])
def test_k0_class(critical, name, cw):
    """C_b = 0, C_W = 1 / sigma'(0)^2, K* = 0, chi_parallel = chi_perp = 1 to 1e-10."""
    c = critical[name]
    assert c.universality_class == "K*=0"
    assert c.bias_var == 0.0 and c.fixed_point == 0.0
    np.testing.assert_allclose(c.weight_var, cw, **tol(EXACT, F64))
    np.testing.assert_allclose([c.chi_parallel, c.chi_perp], 1.0, rtol=0, atol=1e-10)
    assert c.is_critical and c.phase == "critical"


@pytest.mark.parametrize("cw, phase", [(1.5, "chaotic"), (0.5, "ordered")])
def test_tanh_phases(x64, cw, phase):
    """tanh, C_b = 0: C_W = 1.5 flows to K* > 0 with chi_perp > 1; C_W = 0.5 to K* = 0."""
    c = criticality("tanh", cw, 0.0)
    assert c.phase == phase and not c.is_critical
    assert c.stability == "stable"
    if cw > 1:
        assert c.fixed_point > 0 and c.chi_perp > 1
        fk, chi_par, chi_perp = _reference("tanh", cw, 0.0, c.fixed_point)
        np.testing.assert_allclose(fk, c.fixed_point, **tol(QUADRATURE, F64))
        np.testing.assert_allclose(
            [c.chi_parallel, c.chi_perp], [chi_par, chi_perp], **tol(QUADRATURE, F64)
        )
        assert 0.0 in c.fixed_points  # K = 0 is a fixed point too, but unstable
        assert criticality("tanh", cw, 0.0, k_init=0.0).fixed_point == 0.0
    else:
        assert c.fixed_point == 0.0 and c.chi_perp == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Non-trivial critical points


@pytest.mark.parametrize("name", ["gelu", "swish", "silu"])
def test_nontrivial_critical_point(critical, name):
    """K* = C_b + C_W <s^2>_K*, chi_par = chi_perp = 1, all by independent quadrature."""
    c = critical[name]
    assert c.universality_class == "other" and c.is_critical
    assert c.bias_var > 0 and c.fixed_point > 0
    fk, chi_par, chi_perp = _reference(name, c.weight_var, c.bias_var, c.fixed_point)
    np.testing.assert_allclose(fk, c.fixed_point, rtol=1e-8, atol=0)
    np.testing.assert_allclose([chi_par, chi_perp], 1.0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        [c.chi_parallel, c.chi_perp], [chi_par, chi_perp], **tol(QUADRATURE, F64)
    )


def test_gelu_closed_form_kstar(critical):
    """Exact GELU: <s s''>_K is proportional to 2 + 3K - K^2, so K* = (3 + sqrt 17) / 2."""
    c = critical["gelu"]
    np.testing.assert_allclose(c.fixed_point, (3 + math.sqrt(17)) / 2, **tol(EXACT, F64))


def test_silu_is_swish(critical):
    a, b = critical["swish"], critical["silu"]
    assert (a.fixed_point, a.weight_var, a.bias_var) == (b.fixed_point, b.weight_var, b.bias_var)


def test_half_stable_fixed_points(x64, critical):
    """At the GELU/SWISH critical point f(K) - K touches zero at K*; which K* criticality reports
    depends on the starting kernel, and it recovers the critical one from the right side."""
    g = critical["gelu"]
    assert "approached only from above" in g.note and len(g.fixed_points) == 2
    below = criticality("gelu", g.weight_var, g.bias_var)  # from K -> 0+: the lower, stable one
    assert below.fixed_point < g.fixed_point and not below.is_critical
    above = criticality("gelu", g.weight_var, g.bias_var, k_init=2 * g.fixed_point)
    np.testing.assert_allclose(above.fixed_point, g.fixed_point, rtol=1e-9)
    assert above.is_critical
    s = critical["swish"]
    assert "approached only from below" in s.note
    again = criticality("swish", s.weight_var, s.bias_var)
    np.testing.assert_allclose(again.fixed_point, s.fixed_point, rtol=1e-9)
    assert again.is_critical


# ---------------------------------------------------------------------------------------------
# chi_parallel is the slope of the recursion map


@pytest.mark.parametrize(
    "name, cw, cb",
    [
        ("tanh", 1.5, 0.0),
        ("tanh", 1.2, 0.3),
        ("erf", 2.0, 0.1),
        ("gelu", 1.5, 0.2),
        ("swish", 1.7, 0.4),
    ],
)
def test_chi_parallel_is_map_derivative(x64, name, cw, cb):
    """chi_parallel = dK'/dK at K*, by a central difference of the NumPy-quadrature map."""
    c = criticality(name, cw, cb)
    k = c.fixed_point
    assert 0 < k < math.inf
    s, _ = NUMPY_ACTS[name]

    def recursion(t):
        return cb + cw * _gh_mean(lambda z: s(z) ** 2, t)

    h = 1e-5 * k
    slope = (recursion(k + h) - recursion(k - h)) / (2 * h)
    np.testing.assert_allclose(c.chi_parallel, slope, rtol=0, atol=FD_ATOL)
    np.testing.assert_allclose(recursion(k), k, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# No critical point, classification of callables


@pytest.mark.parametrize("name", ["sigmoid", "softplus"])
def test_no_critical_point(x64, name):
    with pytest.raises(ValueError, match=rf"^activation: {name} has no critical point \(.+\)"):
        critical_point(name)
    c = criticality(name, 1.0, 0.1)
    assert c.universality_class == "none" and not c.is_critical


def test_softplus_unbounded(x64):
    c = criticality("softplus", 2.5, 0.0)
    assert math.isinf(c.fixed_point) and c.phase == "unbounded" and math.isnan(c.chi_perp)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (jnp.tanh, "K*=0"),
        (lambda x: x * jax.nn.sigmoid(x), "other"),
        (jax.nn.sigmoid, "none"),
        (lambda x: jnp.maximum(x, 0.0), "scale-invariant"),
    ],
)
def test_callable_classified(x64, fn, expected):
    c = criticality(fn, 1.0, 0.0)
    assert c.universality_class == expected
    assert c.activation.startswith("custom:")


def test_callable_matches_registry(critical, x64):
    c = critical_point(lambda x: x * jax.nn.sigmoid(x))
    ref = critical["swish"]
    np.testing.assert_allclose(
        [c.fixed_point, c.weight_var, c.bias_var],
        [ref.fixed_point, ref.weight_var, ref.bias_var],
        **tol(EXACT, F64),
    )


# ---------------------------------------------------------------------------------------------
# Result object, speed, dtype, bad input


def test_result_and_str(critical):
    c = critical["gelu"]
    assert isinstance(c, Criticality) and c.universality_class in UNIVERSALITY_CLASSES
    with pytest.raises(AttributeError):
        c.weight_var = 1.0  # frozen
    assert all(isinstance(v, float) for v in (c.fixed_point, c.chi_parallel, c.chi_perp))
    text = str(c)
    assert "gelu" in text and "other" in text and "critical" in text


def test_float64_regardless_of_default():
    """Without x64 the scalar analysis still runs in float64 (no spurious fixed points from
    float32 roundoff near the double zero of f(K) - K), and leaves the setting as it was."""
    assert not jax.config.jax_enable_x64
    c = critical_point("gelu")
    assert c.tol == 1e-8 and c.is_critical
    assert c.fixed_point == pytest.approx((3 + np.sqrt(17)) / 2, rel=1e-10)
    assert len(c.fixed_points) == 2
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="nope"), "^activation: unknown name"),
        (dict(activation=3), "^activation:"),
        (dict(weight_var=-1.0), "^weight_var: expected a finite number >= 0"),
        (dict(weight_var=float("nan")), "^weight_var:"),
        (dict(weight_var=True), "^weight_var:"),
        (dict(weight_var=np.ones(2)), "^weight_var:"),
        (dict(bias_var=-0.1), "^bias_var: expected a finite number >= 0"),
        (dict(bias_var=float("inf")), "^bias_var:"),
        (dict(bias_var="1"), "^bias_var:"),
        (dict(order=1), "^order:"),
        (dict(tol=0.0), "^tol:"),
        (dict(k_init=-1.0), "^k_init:"),
    ],
)
def test_bad_input(x64, kwargs, match):
    args = dict(activation="tanh", weight_var=1.0, bias_var=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        criticality(args.pop("activation"), args.pop("weight_var"), args.pop("bias_var"), **args)


def test_bad_input_critical_point(x64):
    with pytest.raises(ValueError, match="^activation: unknown name"):
        critical_point("nope")
    with pytest.raises(ValueError, match="^order:"):
        critical_point("tanh", order=0)
    assert get_activation("tanh").name == "tanh"
