"""rgnn.end_of_training: the O(1/n) mean of trained networks.

Exact checks (steps = 0, convergence as the limit of finite steps, the train-set correction at
convergence, the parts summing to the correction, the time kernels against brute-force sums)
and a Monte Carlo check over finite networks after two gradient-descent steps at four widths:
the fitted 1/n coefficient of the test outputs' mean and of the NTK change against the
prediction (two steps exercise every term: the NTK fluctuations, the dNTK at both times, the
nested ddNTK sums). The converged check over many widths is tools/end_of_training_mc.py.
"""

import dataclasses
import importlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn import training_theory
from tests.tiers import tiered
from tests.tolerances import EXACT, MC_SIGMAS, tol

N_TRAIN, N_TEST = 2, 1


def _problem():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N_TRAIN + N_TEST, 3))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(3)
    y = np.sin(x[:N_TRAIN, :1]) + 0.5 * x[:N_TRAIN, 1:2]
    return jnp.asarray(x[:N_TRAIN]), jnp.asarray(y), jnp.asarray(x[N_TRAIN:])


def _arch(width=64, activation="tanh", depth=1, **residual):
    return rgnn.MLP(depth, width, activation=activation, bias_var=0.1, **residual)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(arch="mlp"), "arch"),
        (dict(arch=rgnn.MLP(1, 8, parameterization="standard")), "parameterization"),
        (dict(arch=rgnn.MLP(2, 8, "relu", shortcut=0.5)), "kinked activation 'relu'"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=True), "learning_rate"),
        (dict(learning_rate=1e6), "stability limit"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(x_train=np.full((2, 3), np.nan)), "x_train"),
        (dict(x_test=np.ones((1, 4))), "x_test"),
        (dict(y_train=np.ones((3, 1))), "y_train"),
        (dict(y_train=np.array([[np.nan], [1.0]])), "y_train"),
        (dict(x_train=np.ones((2, 3))), "singular"),
        (dict(statistics="precomputed"), "statistics"),
        (dict(quadrature_order_multi=2), "quadrature_order_multi"),
    ],
)
def test_bad_input(x64, change, match):
    x_tr, y, x_te = _problem()
    kw = dict(arch=_arch(), x_train=x_tr, y_train=y, x_test=x_te, learning_rate=1.0)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        rgnn.end_of_training(
            kw.pop("arch"), kw.pop("x_train"), kw.pop("y_train"), kw.pop("x_test"), **kw
        )


@pytest.mark.parametrize("activation", ["linear", "tanh", "relu"])
def test_full_statistics_gate_agrees_with_perturbative(x64, activation):
    """``_full_statistics_missing`` (end_of_training's and the sweep's one gate on residual
    MLPs) says None exactly where ``rgnn.perturbative(..., full=True)`` gives the four-index
    fields of a residual MLP, and otherwise names what perturbative refuses. (The refusal is
    the same with and without the NTK, dNTK and ddNTK: the kernel side is computed here.)"""
    arch = rgnn.MLP(2, 4, activation, shortcut=0.5, branch=0.8)
    x_tr, _, _ = _problem()
    missing = training_theory._full_statistics_missing(arch)
    kw = dict(full=True, warn=False)
    if missing is None:
        p = rgnn.perturbative(arch, x_tr, ntk=False, **kw)
        assert p.vertex.shape == (arch.n_layers,) + (N_TRAIN,) * 4
    else:
        kw.update(ddntk=True, kinks="pointwise")
        assert f"activation {activation!r}" in missing and "\n" not in missing
        with pytest.raises(ValueError, match="^full:"):
            rgnn.perturbative(arch, x_tr, **kw)


# ----------------------------------------------------------------------------- time kernels
def test_time_kernels_against_brute_force(x64):
    """``_kernel`` (gap recursion) equals the nested sums written out, finite and converged."""
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-0.9, 0.9, 3) for _ in range(3)]  # factor per time
    fin = rng.uniform(-0.9, 0.9, 3)
    steps = 7
    brute_fin, brute_one = 0.0, 0.0
    for ts in itertools.combinations(range(steps), 3):
        term = xs[0] ** ts[0] * xs[1] ** ts[1] * xs[2] ** ts[2]
        brute_fin = brute_fin + term * fin ** (steps - 1 - ts[2])
        brute_one = brute_one + term
    # gap factors: gap 0 carries every factor, gap 1 the last two, gap 2 the last
    gaps = [xs[0] * xs[1] * xs[2], xs[1] * xs[2], xs[2]]
    const = xs[1] * xs[2] ** 2
    gaps, const, fin = [jnp.asarray(g) for g in gaps], jnp.asarray(const), jnp.asarray(fin)
    got = training_theory._kernel(gaps, const, steps, final=fin)
    np.testing.assert_allclose(got, brute_fin, **tol(EXACT, jnp.float64))
    got = training_theory._kernel(gaps, const, steps)
    np.testing.assert_allclose(got, brute_one, **tol(EXACT, jnp.float64))
    long = 0.0
    for ts in itertools.combinations(range(60), 3):
        long = long + xs[0] ** ts[0] * xs[1] ** ts[1] * xs[2] ** ts[2]
    conv = training_theory._kernel(gaps, const, None)
    # the tail beyond 60 steps is below 0.9^58 ~ 2e-3 of the largest term: compare to that
    np.testing.assert_allclose(conv, long, rtol=0, atol=float(0.9**58) * 60)
    np.testing.assert_allclose(
        conv, training_theory._kernel(gaps, const, 400), **tol(EXACT, jnp.float64)
    )


# ----------------------------------------------------------------------------- exact limits
@pytest.fixture(scope="module")
def gelu_stats():
    # under the suite's strict rank promotion, as the tests run (one compilation for both)
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        x_tr, _, x_te = _problem()
        x_all = jnp.concatenate([x_tr, x_te])
        arch = _arch(activation="gelu")
        return arch, x_all, rgnn.perturbative(arch, x_all, full=True, ddntk=True, warn=False)


@pytest.fixture(scope="module")
def gelu_runs(gelu_stats):
    with jax.enable_x64(True):
        x_tr, y, x_te = _problem()
        arch, _, stats = gelu_stats
        kw = dict(learning_rate=1.0, statistics=stats)
        conv = rgnn.end_of_training(arch, x_tr, y, x_te, **kw)
        zero = rgnn.end_of_training(arch, x_tr, y, x_te, steps=0, **kw)
        long = rgnn.end_of_training(arch, x_tr, y, x_te, steps=3000, **kw)
        return conv, zero, long


def test_subset_error_estimate_equal_to_the_direct_one(x64, gelu_stats, monkeypatch):
    """The full layout of many inputs (rgnn.perturbative's path for end_of_training: the flow
    once, the shifted one- and two-input rules' error estimate on a subset of the inputs
    instead of a second pass over all of them) is the direct computation: forced here on the
    three inputs with the subset holding all of them, every field and the error estimate are
    identical."""
    arch, x_all, stats = gelu_stats
    module = importlib.import_module("rgnn.perturbative")
    monkeypatch.setattr(module, "_DIRECT_WORK", -1)
    monkeypatch.setattr(module, "_ESTIMATE_INPUTS", x_all.shape[0])
    once = rgnn.perturbative(arch, x_all, full=True, ddntk=True, warn=False)
    for field in dataclasses.fields(stats):
        a, b = getattr(once, field.name), getattr(stats, field.name)
        if isinstance(b, jax.Array):
            np.testing.assert_array_equal(a, b, err_msg=field.name)
    assert once.quadrature_error == stats.quadrature_error > 0


def test_steps_zero_is_initialization(x64, gelu_runs):
    _, zero, _ = gelu_runs
    for name in ("mean", "correction", "train_correction", "ntk_change"):
        np.testing.assert_array_equal(getattr(zero, name), 0.0)


def test_convergence_is_the_limit_of_steps(x64, gelu_runs):
    conv, _, long = gelu_runs
    lam = np.linalg.eigvalsh(np.asarray(conv.ntk[:N_TRAIN, :N_TRAIN]))
    e = conv.learning_rate / N_TRAIN
    assert np.max(np.abs(1 - e * lam)) ** 3000 < 1e-14
    for name in ("mean", "correction", "train_mean", "ntk_change"):
        np.testing.assert_allclose(
            getattr(long, name), getattr(conv, name), **tol(EXACT, jnp.float64)
        )
    # on the training inputs every network reaches its targets
    np.testing.assert_array_equal(conv.train_correction, 0.0)
    np.testing.assert_allclose(long.train_correction, 0.0, **tol(EXACT, jnp.float64))
    x_tr, y, _ = _problem()
    np.testing.assert_allclose(conv.train_mean, y, **tol(EXACT, jnp.float64))


def test_parts_sum_to_correction(x64, gelu_runs):
    conv, _, _ = gelu_runs
    parts = sum(
        getattr(conv, "correction_" + k)
        for k in ("ntk_mean", "ntk_fluctuation", "dntk", "ddntk1", "ddntk2")
    )
    np.testing.assert_allclose(parts, conv.correction, **tol(EXACT, jnp.float64))
    assert conv.valid and conv.scaling == "1/n"
    assert conv.correction.shape == (N_TEST, 1)
    assert conv.ntk_change.shape == (N_TRAIN + N_TEST,) * 2
    np.testing.assert_allclose(conv.ntk_change, conv.ntk_change.T, **tol(EXACT, jnp.float64))


@pytest.mark.parametrize("activation", tiered(["linear", "tanh"], slow={"tanh"}))
def test_sweep_rescales_a_residual_prediction_by_width(x64, monkeypatch, activation):
    """The sweep computes the prediction once per group and rescales its O(1/n) fields by
    width (``study._EOT_CACHE``): for a residual MLP of equal hidden widths the statistics
    are ``c / n`` with ``c`` width independent, so the rescaled prediction at width 32 is the
    one computed at width 32, finite (the sweep's test input is generic: a copy of a training
    input makes a nonlinear residual MLP's set kernels singular). tanh: ~50 s of statistics."""
    study = importlib.import_module("rgnn.study")
    monkeypatch.setattr(study, "_EOT_CACHE", {})
    x_tr, y, _ = _problem()
    settings = dict(learning_rate=0.5, steps=3, optimizer="gd", loss="mse")

    def arch(w):
        return _arch(w, activation, 2, shortcut=0.8, branch=0.6)

    first = study._end_of_training(arch(8), x_tr, y, settings)
    assert isinstance(first, rgnn.EndOfTraining), first
    rescaled = study._end_of_training(arch(32), x_tr, y, settings)
    assert len(study._EOT_CACHE) == 1 and rescaled.width == 32
    probe = study._probe_input(np.asarray(x_tr))
    direct = rgnn.end_of_training(arch(32), x_tr, y, probe, learning_rate=0.5, steps=3)
    assert np.all(np.isfinite(np.asarray(direct.ntk_change)))
    assert np.all(np.isfinite(np.asarray(direct.correction)))
    for field in dataclasses.fields(direct):
        a, b = getattr(rescaled, field.name), getattr(direct, field.name)
        if isinstance(b, jax.Array):
            np.testing.assert_allclose(a, b, **tol(EXACT, jnp.float64), err_msg=field.name)
        else:
            assert a == b, field.name


@pytest.mark.slow
def test_relu_says_not_one_over_n(x64):
    x_tr, y, x_te = _problem()
    with pytest.warns(UserWarning, match="not 1/n"):
        r = rgnn.end_of_training(_arch(activation="relu"), x_tr, y, x_te, learning_rate=1.0)
    assert not r.valid


# ----------------------------------------------------------------------------- Monte Carlo
def _pairs(arch, x_tr, y, x_te, eta, steps, n_pairs, seed):
    """Per antithetic pair (output layer flipped): test-output residual against the kernel-GD
    trajectory with the fixed-point NTK (mean known exactly), and the output NTK change."""
    from flax import nnx

    x_all = jnp.concatenate([x_tr, x_te])
    ens = rgnn.ensemble(arch, 3, n_networks=n_pairs, key=jax.random.key(seed), dtype=x_tr.dtype)
    last = arch.n_layers - 1

    def flip(path, leaf):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        return -leaf if last in keys else leaf

    theta = rgnn.fixed_point(arch, x_all).ntk[-1]
    lam, v = np.linalg.eigh(np.asarray(theta[:N_TRAIN, :N_TRAIN]))
    e = eta / N_TRAIN
    reg = np.asarray(theta[N_TRAIN:, :N_TRAIN]) @ v @ np.diag((1 - (1 - e * lam) ** steps) / lam)
    lin = jnp.asarray(reg @ v.T)

    def loss(s):
        return 0.5 * jnp.mean((nnx.merge(ens.graphdef, s)(x_tr) - y) ** 2)

    def train(s):
        for _ in range(steps):
            s = jax.tree_util.tree_map(lambda p, g: p - eta * g, s, jax.grad(loss)(s))
        return s

    res, dk = [], []
    for state in (ens.state, jax.tree_util.tree_map_with_path(flip, ens.state)):
        member = rgnn.Ensemble(state, ens.graphdef, arch, 3)
        z0 = jax.vmap(lambda s: nnx.merge(ens.graphdef, s)(x_all))(state)[..., 0]
        fin = jax.jit(jax.vmap(train))(state)
        zt = jax.vmap(lambda s: nnx.merge(ens.graphdef, s)(x_te))(fin)[..., 0]
        zlin = z0[:, N_TRAIN:] + (y[:, 0][None] - z0[:, :N_TRAIN]) @ lin.T
        res.append(zt - zlin)
        k0 = rgnn.empirical_ntk(member, x_all)[:, -1]
        kt = rgnn.empirical_ntk(rgnn.Ensemble(fin, ens.graphdef, arch, 3), x_all)[:, -1]
        dk.append((kt - k0).reshape(n_pairs, -1))
    return np.asarray(0.5 * (res[0] + res[1])), np.asarray(0.5 * (dk[0] + dk[1]))


def _fit(widths, values, ses):
    n = np.asarray(widths, float)
    yv, sv = n * values, n * ses
    a = np.stack([np.ones_like(n), 1 / n], axis=1) / sv[:, None]
    coef, *_ = np.linalg.lstsq(a, yv / sv, rcond=None)
    return coef[0], math.sqrt(np.linalg.inv(a.T @ a)[0, 0])


def _check_two_steps(arch_of, n_pairs):
    """Two steps at a large learning rate (``e lambda_max = 1.5``), widths 32-256 (``arch_of``
    gives the architecture of a width), ``n_pairs`` antithetic pairs each: fitted ``c`` of
    ``n * departure = c + d / n`` within MC_SIGMAS of ``n * correction`` for the test output
    and every entry of the NTK change, most of the predictions resolved from zero."""
    x_tr, y, x_te = _problem()
    widths = (32, 64, 128, 256)
    steps = 2
    arch0 = arch_of(widths[0])
    theta = rgnn.fixed_point(arch0, jnp.concatenate([x_tr, x_te])).ntk[-1]
    eta = 1.5 * N_TRAIN / float(np.linalg.eigvalsh(np.asarray(theta[:2, :2]))[-1])
    pred = rgnn.end_of_training(arch0, x_tr, y, x_te, learning_rate=eta, steps=steps)
    means, ses, kmeans, kses = [], [], [], []
    for w in widths:
        r, k = _pairs(arch_of(w), x_tr, y, x_te, eta, steps, n_pairs, seed=w)
        means.append(r.mean(0))
        ses.append(r.std(0, ddof=1) / math.sqrt(len(r)))
        kmeans.append(k.mean(0))
        kses.append(k.std(0, ddof=1) / math.sqrt(len(k)))
    means, ses, kmeans, kses = map(np.asarray, (means, ses, kmeans, kses))
    predicted = (
        np.concatenate([np.asarray(pred.correction[:, 0]), np.asarray(pred.ntk_change).ravel()])
        * widths[0]
    )
    measured = np.concatenate([means, kmeans], axis=1)
    errors = np.concatenate([ses, kses], axis=1)
    resolved = 0
    for j in range(measured.shape[1]):
        c, se = _fit(widths, measured[:, j], errors[:, j])
        assert abs(c - predicted[j]) < MC_SIGMAS * se, (j, c, se, predicted[j])
        resolved += abs(predicted[j]) > MC_SIGMAS * se
    # not vacuous: most predicted coefficients are themselves resolved from zero
    assert resolved >= measured.shape[1] // 2


@pytest.mark.slow
def test_two_steps_against_trained_networks(x64):
    """tanh, depth 1, 1024 antithetic pairs per width (``_check_two_steps``; with 2048 pairs:
    |z| <= 1.72 over the 10 entries, fit standard errors 1-12% of the predictions)."""
    _check_two_steps(lambda w: _arch(w), 1024)


@pytest.mark.slow
@pytest.mark.parametrize(
    "depth, residual",
    [(2, dict(shortcut=0.8, branch=0.6)), (3, dict(shortcut=(0.5, 1.0), branch=(1.0, 0.5)))],
    ids=["constant", "per-layer"],
)
def test_linear_residual_two_steps_against_trained_networks(x64, depth, residual):
    """A linear residual MLP (PDLT appendix B; its full statistics are exact,
    rgnn.flow.rules), one shortcut for every residual layer and one per layer, 512 antithetic
    pairs per width (``_check_two_steps``). The predicted test-output correction comes from
    the NTK fluctuations, the dNTK and the second ddNTK (the NTK mean shift and the first
    ddNTK vanish for a linear activation)."""
    _check_two_steps(lambda w: _arch(w, "linear", depth, **residual), 512)
