"""Bad input raises a ValueError that names the argument and says what was expected."""

import jax
import numpy as np
import pytest

import rgnn

X = np.ones((3, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0, width=8), "depth"),
        (dict(depth=2.5, width=8), "depth"),
        (dict(depth=2, width=0), "width"),
        (dict(depth=2, width=(8, 0)), "width"),
        (dict(depth=2, width=(8,)), "width: expected one width per hidden layer"),
        (dict(depth=2, width=8, activation="relux"), "activation: unknown name 'relux'.*relu, "),
        (dict(depth=2, width=8, activation=3), "activation"),
        (dict(depth=2, width=8, weight_var=-1.0), "weight_var"),
        (dict(depth=2, width=8, weight_var=0.0), "weight_var"),
        (dict(depth=2, width=8, bias_var=-0.1), "bias_var"),
        (dict(depth=2, width=8, bias_var=float("nan")), "bias_var"),
        (dict(depth=2, width=8, parameterization="mu"), "parameterization"),
        (dict(depth=2, width=8, out_dim=0), "out_dim"),
    ],
)
def test_bad_architecture(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rgnn.MLP(**kwargs)


def test_unknown_activation_lists_known_ones():
    with pytest.raises(ValueError) as err:
        rgnn.MLP(2, 8, "swishy")
    for name in rgnn.KNOWN_ACTIVATIONS:
        assert name in str(err.value)


ARCH = rgnn.MLP(2, 8, "erf")


@pytest.mark.parametrize(
    "x1, x2, match",
    [
        (np.array([[1.0, np.nan]]), None, "x1: expected finite values"),
        (np.array([[1.0, np.inf]]), None, "x1: expected finite values"),
        (X, np.array([[1.0, -np.inf, 0, 0]]), "x2: expected finite values"),
        (X, np.ones((2, 5)), "x2: expected 4 features to match x1"),
        (np.ones(4), None, "x1: expected a 2-D array"),
        (np.ones((2, 3, 4)), None, "x1: expected a 2-D array"),
        (X, np.ones(4), "x2: expected a 2-D array"),
        (np.ones((0, 4)), None, "x1: expected at least one input"),
        (np.array([["a", "b"]]), None, "x1: expected a real numeric array"),
    ],
)
def test_bad_inputs(x1, x2, match):
    with pytest.raises(ValueError, match=match):
        rgnn.fixed_point(ARCH, x1, x2)


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        rgnn.fixed_point(ARCH, X, backend="jax")
    with pytest.raises(ValueError, match="quadrature_order"):
        rgnn.fixed_point(ARCH, X, quadrature_order=0)
    with pytest.raises(ValueError, match="quadrature_rule"):
        rgnn.fixed_point(ARCH, X, quadrature_rule="simpson")
    with pytest.raises(ValueError, match="arch"):
        rgnn.fixed_point("mlp", X)


def test_bad_ensemble_and_empirical_inputs():
    with pytest.raises(ValueError, match="n_networks"):
        rgnn.ensemble(ARCH, 4, n_networks=0, key=jax.random.key(0))
    ens = rgnn.ensemble(ARCH, 4, n_networks=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="x1: expected 4 features"):
        rgnn.empirical_ntk(ens, np.ones((3, 5)))
    with pytest.raises(ValueError, match="x1: expected finite values"):
        rgnn.empirical_nngp(ens, np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="estimator"):
        rgnn.empirical_nngp(ens, X, estimator="mean")
    with pytest.raises(ValueError, match="model"):
        rgnn.empirical_ntk("net", X)
