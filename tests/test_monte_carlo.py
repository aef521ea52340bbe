"""Finite flax networks converge to the fixed point: means within their standard error, spread
falling like width^(-1/2) (slope from a weighted fit, tolerance from the fit's standard error)."""

import functools

import jax
import numpy as np
import pytest

import rgnn
from tests.tiers import tiered
from tests.tolerances import MC_SIGMAS

WIDTHS = (32, 64, 128, 256)
N_NETWORKS = 256
CONFIGS = {
    "relu-ntk-critical": dict(activation="relu", weight_var=2.0, bias_var=0.0),
    "tanh-standard": dict(
        activation="tanh", weight_var=1.5, bias_var=0.1, parameterization="standard"
    ),
    "gelu-ntk": dict(activation="gelu", weight_var=1.8, bias_var=0.05),
}


def _inputs():
    rng = np.random.RandomState(1)
    x = rng.randn(3, 6)
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))


@functools.cache
def _ensembles(name):
    """Per width: (fixed point, empirical NNGP [M, L+1, N, N], empirical NTK [M, L+1, N, N])."""
    x = _inputs()
    out = {}
    with jax.enable_x64(True):
        for i, width in enumerate(WIDTHS):
            arch = rgnn.MLP(3, width, **CONFIGS[name])
            ens = rgnn.ensemble(arch, x.shape[1], n_networks=N_NETWORKS, key=jax.random.key(i))
            fp = rgnn.fixed_point(arch, x)
            out[width] = (
                fp,
                np.asarray(rgnn.empirical_nngp(ens, x)),
                np.asarray(rgnn.empirical_ntk(ens, x)),
            )
    return out


def _log_std_and_se(samples):
    """log of the sample standard deviation and its standard error (delta method, using the
    sample's own fourth moment, so heavy tails widen the error bar instead of being ignored)."""
    m = samples.shape[0]
    c = samples - samples.mean()
    var = np.mean(c**2) * m / (m - 1)
    mu4 = np.mean(c**4)
    var_of_var = (mu4 - var**2 * (m - 3) / (m - 1)) / m
    return 0.5 * np.log(var), 0.5 * np.sqrt(var_of_var) / var


def _weighted_slope(x, y, se):
    """Weighted least-squares slope of y on x and its standard error."""
    w = 1 / se**2
    design = np.stack([np.ones_like(x), x], axis=1)
    cov = np.linalg.inv(design.T @ (w[:, None] * design))
    coef = cov @ design.T @ (w * y)
    return coef[1], np.sqrt(cov[1, 1])


# gelu in the slow tier (with its spread test, which shares its ensembles): relu (NTK
# parameterization) and tanh (standard) stay in the default run
@pytest.mark.parametrize("name", tiered(CONFIGS, ("gelu-ntk",)))
@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_ensemble_mean_matches_fixed_point(name, kernel):
    """At each width, every entry of every layer's ensemble-mean kernel is within MC_SIGMAS
    standard errors of the fixed point. Layer 1 is deterministic and must match exactly."""
    for width, (fp, nngp, ntk) in _ensembles(name).items():
        emp = nngp if kernel == "nngp" else ntk
        ref = np.asarray(fp.nngp if kernel == "nngp" else fp.ntk)
        np.testing.assert_allclose(emp[:, 0], np.broadcast_to(ref[0], emp[:, 0].shape), rtol=1e-12)
        mean = emp[:, 1:].mean(0)
        se = emp[:, 1:].std(0, ddof=1) / np.sqrt(emp.shape[0])
        z = np.abs(mean - ref[1:]) / se
        assert np.all(z <= MC_SIGMAS), f"width {width}: max |z| = {z.max():.2f}"


@pytest.mark.parametrize("name", tiered(CONFIGS, ("gelu-ntk",)))
@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_spread_falls_as_inverse_sqrt_width(name, kernel):
    """The ensemble standard deviation of the output layer's kernel entries, relative to the
    fixed point, scales as width^(-1/2): the fitted log-log slope is -1/2 within MC_SIGMAS of
    its standard error. (Relative, because the standard-parameterization NTK itself grows
    like the width: lambda_W = n.)"""
    runs = _ensembles(name)
    for a, b in [(0, 0), (0, 1)]:
        logs, ses = [], []
        for _, (fp, nngp, ntk) in runs.items():
            emp = nngp if kernel == "nngp" else ntk
            ref = float((fp.nngp if kernel == "nngp" else fp.ntk)[-1, a, b])
            ls, se = _log_std_and_se(emp[:, -1, a, b])
            logs.append(ls - np.log(abs(ref)))
            ses.append(se)
        slope, slope_se = _weighted_slope(np.log(WIDTHS), np.array(logs), np.array(ses))
        assert abs(slope + 0.5) <= MC_SIGMAS * slope_se, (slope, slope_se)
        assert slope_se < 0.1  # the check has power: it can tell -1/2 from 0 and from -1


def test_parameters_are_jax_normal_draws_bit_for_bit(x64):
    """The networks' parameters are ``sqrt(var) * jax.random.normal(key, shape)``, exactly:
    rgnn draws them at a shared power-of-two size and crops (one sampler compilation per size
    class), which JAX's partitionable threefry generator makes the same numbers; vmapped over
    an ensemble's keys as rgnn.ensemble draws them, on shapes below and at a power of two."""
    from rgnn.architecture import _scaled_normal

    scale = jax.numpy.sqrt(1.7)
    keys = jax.random.split(jax.random.key(5), 3)
    for shape in [(3,), (5, 7), (8, 8)]:
        ref = jax.vmap(lambda k, s=shape: scale * jax.random.normal(k, s, np.float64))(keys)
        got = jax.vmap(lambda k, s=shape: _scaled_normal(k, scale, s, np.float64))(keys)
        assert got.dtype == ref.dtype == np.float64 and got.shape == ref.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
