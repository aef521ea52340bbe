"""rgnn.compare and its pieces: the linearized prediction against neural-tangents and against
its own iteration, CKA, the reference kernels, the empirical NTK against neural-tangents, the
width scaling of each measure (its derived slope, fitted over 4 widths), muP's feature
learning, and the initialization statistics against the perturbative prediction."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from tests.tolerances import EXACT, MC_SIGMAS, QUADRATURE, tol


def _psd(rng, n):
    a = rng.randn(n, n)
    return a @ a.T / n + 0.5 * np.eye(n)


# ----------------------------------------------------------------------------- linearized
def test_linearized_flow_matches_neural_tangents(x64):
    """Gradient flow on the mse: rgnn's closed form equals neural-tangents'
    ``predict.gradient_descent_mse`` (same loss normalization, same learning rate)."""
    nt = rgnn.import_neural_tangents()
    rng = np.random.RandomState(0)
    n, n_test, c = 7, 3, 2
    k = _psd(rng, n)
    k_test = rng.randn(n_test, n) * 0.3
    y = rng.randn(n, c)
    f0, f0_test = rng.randn(n, c), rng.randn(n_test, c)
    times = np.array([0.0, 0.7, 5.0, 40.0])
    f, ft = rgnn.linearized_prediction(
        k, y, f0, times, learning_rate=0.8, ntk_test=k_test, f0_test=f0_test, continuous=True
    )
    predict = nt.predict.gradient_descent_mse(k, y, learning_rate=0.8)
    ref, ref_test = predict(times, f0, f0_test, k_test)
    np.testing.assert_allclose(f, ref, **tol(EXACT, f.dtype))
    np.testing.assert_allclose(ft, ref_test, **tol(EXACT, f.dtype))


def _iterate(k, k_test, y, f0, f0_test, eta, steps, grad, batches=None):
    """The kernel-gradient-descent step written out in numpy."""
    f, ft, out = f0.copy(), f0_test.copy(), {}
    for s in range(max(steps) + 1):
        if s in steps:
            out[s] = (f.copy(), ft.copy())
        idx = np.arange(len(f)) if batches is None else batches(s)
        g = grad(f[idx], idx)
        f = f - eta / len(idx) * k[:, idx] @ g
        ft = ft - eta / len(idx) * k_test[:, idx] @ g
    return np.stack([out[s][0] for s in steps]), np.stack([out[s][1] for s in steps])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "mse-sgd"])
def test_linearized_steps_match_their_iteration(loss, x64):
    """Discrete gradient descent: the mse closed form, and the iterated cross-entropy and
    minibatch paths, equal the step rule iterated in numpy; a full [N, C, N, C] kernel
    ``Theta x I`` gives the same as the [N, N] kernel."""
    rng = np.random.RandomState(1)
    n, n_test, c, eta, steps = 6, 2, 3, 0.9, [0, 1, 4, 9]
    k, k_test = _psd(rng, n), rng.randn(n_test, n) * 0.3
    f0, f0_test = rng.randn(n, c), rng.randn(n_test, c)
    batch = None
    if loss == "cross_entropy":
        y = np.array([0, 2, 1, 1, 0, 2])
        onehot = np.eye(c)[y]

        def grad(f, idx):
            e = np.exp(f - f.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True) - onehot[idx]
    else:
        y = rng.randn(n, c)

        def grad(f, idx):
            return (f - y[idx]) / c

        if loss == "mse-sgd":
            key = jax.random.key(5)
            batch = dict(batch_size=4, batch_key=key)

            def batches(s):
                return np.asarray(rgnn.batch_indices(key, s, n, 4))

    kind = "cross_entropy" if loss == "cross_entropy" else "mse"
    ref, ref_test = _iterate(
        k, k_test, y, f0, f0_test, eta, steps, grad, batches if batch else None
    )
    f, ft = rgnn.linearized_prediction(
        k,
        y,
        f0,
        steps,
        learning_rate=eta,
        loss=kind,
        ntk_test=k_test,
        f0_test=f0_test,
        **(batch or {}),
    )
    np.testing.assert_allclose(f, ref, **tol(EXACT, f.dtype))
    np.testing.assert_allclose(ft, ref_test, **tol(EXACT, f.dtype))
    full = np.einsum("ab,ij->aibj", k, np.eye(c))
    f_full, _ = rgnn.linearized_prediction(
        full, y, f0, steps, learning_rate=eta, loss=kind, **(batch or {})
    )
    np.testing.assert_allclose(f_full, ref, **tol(EXACT, f.dtype))


def test_linearized_rejects_bad_shapes():
    with pytest.raises(ValueError, match="ntk: expected a"):
        rgnn.linearized_prediction(
            np.ones((3, 4)), np.ones((3, 1)), np.ones((3, 1)), [1], learning_rate=0.1
        )
    with pytest.raises(ValueError, match="f0: expected shape"):
        rgnn.linearized_prediction(
            np.eye(3), np.ones((3, 1)), np.ones((4, 1)), [1], learning_rate=0.1
        )
    with pytest.raises(ValueError, match="y: expected 3 targets"):
        rgnn.linearized_prediction(
            np.eye(3), np.ones((2, 1)), np.ones((3, 1)), [1], learning_rate=0.1
        )


# ----------------------------------------------------------------------------- kernels
def test_cka_against_explicit_centering(x64):
    rng = np.random.RandomState(2)
    a, b = _psd(rng, 5), _psd(rng, 5)
    h = np.eye(5) - np.ones((5, 5)) / 5
    ha, hb = h @ a @ h, h @ b @ h
    ref = np.sum(ha * hb) / np.sqrt(np.sum(ha * ha) * np.sum(hb * hb))
    np.testing.assert_allclose(rgnn.cka(a, b), ref, **tol(EXACT, np.float64))
    np.testing.assert_allclose(rgnn.cka(a, 3.0 * a + 2.0), 1.0, **tol(EXACT, np.float64))
    np.testing.assert_allclose(rgnn.cka(np.stack([a, b]), a), [1.0, ref], **tol(EXACT, np.float64))


@pytest.mark.parametrize("activation,parameterization", [("relu", "standard"), ("erf", "ntk")])
def test_gaussian_reference_is_the_fixed_point(parameterization, activation, x64):
    """The per-layer-constant recursion of compare's reference equals rgnn.fixed_point where a
    fixed point exists (same maps, same quadrature)."""
    x = np.random.RandomState(3).randn(4, 5)
    arch = rgnn.MLP(
        3, 32, activation, weight_var=1.6, bias_var=0.2, parameterization=parameterization
    )
    k, t = rgnn.gaussian_reference(arch, x, quadrature_order=48)
    fp = rgnn.fixed_point(arch, x, quadrature_order=48)
    table = EXACT if activation == "relu" else QUADRATURE
    np.testing.assert_allclose(k, fp.nngp, **tol(table, k.dtype))
    np.testing.assert_allclose(t, fp.ntk, **tol(table, k.dtype))


def _big_ensemble(arch, in_dim, n_networks, seed):
    """``n_networks`` networks as blocks of 64 (the scaling runs' ensemble size, whose
    samplers are compiled already), stacked into one Ensemble."""
    parts = [
        rgnn.ensemble(arch, in_dim, n_networks=64, key=jax.random.key(seed + i))
        for i in range(n_networks // 64)
    ]
    state = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *[p.state for p in parts])
    return rgnn.Ensemble(state, parts[0].graphdef, arch, in_dim)


def test_mup_reference_matches_monte_carlo():
    """muP at initialization: the ensemble mean of the empirical kernels (output metric
    rescaled, ``rgnn.ensemble_kernels``) agrees with the width-n Gaussian reference
    (``rgnn.gaussian_reference``, as compare builds it) within MC_SIGMAS standard errors on the
    random layer; layer 1 exactly. 64 muP networks of width 64 from the scaling runs."""
    run, c = _scaling_runs("mup")[64]
    for emp, ref in (
        (np.asarray(run.nngp[0]), np.asarray(c.reference_nngp)),
        (np.asarray(run.ntk[0]), np.asarray(c.reference_ntk)),
    ):
        np.testing.assert_allclose(
            emp[:, 0], np.broadcast_to(ref[0], emp[:, 0].shape), **tol(EXACT, emp.dtype)
        )
        mean, se = emp[:, 1:].mean(0), emp[:, 1:].std(0, ddof=1) / np.sqrt(emp.shape[0])
        z = np.abs(mean - ref[1:]) / se
        assert np.all(z <= MC_SIGMAS), z.max()
    # the output NNGP is small (C_b + C_W <s s> / n_L) and the hidden NTK large (~ n)
    k_ref, t_ref = np.asarray(c.reference_nngp), np.asarray(c.reference_ntk)
    assert np.all(np.diag(k_ref[-1]) < 0.1) and np.mean(np.diag(t_ref[0])) > 30


def test_empirical_ntk_matches_neural_tangents(x64):
    """rgnn.empirical_ntk (from the layer structure, no Jacobian) equals neural-tangents'
    ``empirical_ntk_fn`` (all three implementations) on the same parameters, layer by layer:
    the NTK of unit 0 of layer l is NT's kernel of the prefix network up to that layer (all
    three implementations on the whole network, the Jacobian contraction on the prefixes)."""
    nt = rgnn.import_neural_tangents()
    x = np.random.RandomState(6).randn(4, 3)
    arch = rgnn.MLP(2, 6, "erf", weight_var=1.4, bias_var=0.3)
    net = arch.network(3, rngs=__import__("flax").nnx.Rngs(1))
    ours = np.asarray(rgnn.empirical_ntk(net, x))
    params = [(layer.w[...], layer.b[...]) for layer in net.layers]
    for layer in range(1, arch.n_layers + 1):
        _, apply_fn, _ = arch.stax(layer=layer)
        stax_params = []
        for k in range(layer):
            stax_params += [params[k], ()] if k < layer - 1 else [params[k]]
        impls = [nt.NtkImplementation.JACOBIAN_CONTRACTION]
        if layer == arch.n_layers:
            impls += [
                nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
                nt.NtkImplementation.STRUCTURED_DERIVATIVES,
            ]
        for impl in impls:
            fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=impl))
            with jax.numpy_rank_promotion("allow"):  # neural-tangents' Dense adds b to x W
                theirs = np.asarray(fn(x, None, stax_params))[:, :, 0, 0]
            np.testing.assert_allclose(ours[layer - 1], theirs, **tol(EXACT, x.dtype))


# ----------------------------------------------------------------------------- scaling
WIDTHS = (32, 64, 128, 256)


@functools.cache
def _scaling_runs(parameterization):
    """Per width: (training, comparison) of 64 networks after 20 steps of gradient descent."""
    x, y = rgnn.data.teacher_student(8, 4, seed=3)
    out = {}
    with jax.enable_x64(True):
        for i, n in enumerate(WIDTHS):
            arch = rgnn.MLP(1, n, "tanh", weight_var=1.0, parameterization=parameterization)
            run = rgnn.train(
                arch,
                x,
                y,
                steps=20,
                learning_rate=0.5,
                n_networks=64,
                key=jax.random.key(100 + i),
                record_steps=[20],
            )
            out[n] = (run, rgnn.compare(arch, x, run, perturbative=False))
    return out


def _slope(values, ses):
    """Weighted least-squares slope of log(value) on log(width) and its standard error."""
    v, s = np.asarray(values), np.asarray(ses)
    w = (v / s) ** 2  # 1 / var(log v)
    design = np.stack([np.ones(len(WIDTHS)), np.log(WIDTHS)], axis=1)
    cov = np.linalg.inv(design.T @ (w[:, None] * design))
    coef = cov @ design.T @ (w * np.log(v))
    return coef[1], np.sqrt(cov[1, 1])


# (field, step index, layer index or None, derived slope): compare's module docstring
NTK_SCALING = [
    ("nngp_distance", 0, 1, -0.5),
    ("ntk_distance", 0, 1, -0.5),
    ("gap", -1, None, -0.5),
    ("ntk_movement", -1, 1, -1.0),
    ("mean_ntk_movement", -1, 1, -1.0),
    ("linearization_gap", -1, None, -1.0),
]


@pytest.mark.parametrize("field,step,layer,slope", NTK_SCALING)
def test_ntk_parameterization_width_scaling(field, step, layer, slope):
    """NTK parameterization, small learning rate: each measure falls with the power of the
    width derived for it (per-network fluctuations n^-1/2; NTK movement, its effect on the
    outputs and ensemble means n^-1): fitted slope within MC_SIGMAS of its standard error,
    which is small enough to tell -1/2 from -1."""
    runs = _scaling_runs("ntk")
    vals, ses = [], []
    for _, c in runs.values():
        v, s = np.asarray(getattr(c, field))[step], np.asarray(getattr(c, field + "_se"))[step]
        vals.append(v if layer is None else v[layer])
        ses.append(s if layer is None else s[layer])
    fitted, se = _slope(vals, ses)
    assert abs(fitted - slope) <= MC_SIGMAS * se, (fitted, se)
    assert se < 0.12


@pytest.mark.parametrize(
    "field,layer", [("ntk_movement", 1), ("linearization_gap", None), ("gap", None)]
)
def test_mup_features_keep_moving_as_width_grows(field, layer):
    """muP at the same learning rate learns features: the output NTK moves by O(1) and the
    outputs leave the kernel prediction by O(1). Its infinite-width limit is finite with 1/n
    corrections, so the fit ``a + b / n`` has an intercept ``a`` far above zero (MC_SIGMAS of
    its standard error), and the widest network is far from the kernel regime's value."""
    runs = _scaling_runs("mup")
    vals, ses = [], []
    for _, c in runs.values():
        v, s = np.asarray(getattr(c, field))[-1], np.asarray(getattr(c, field + "_se"))[-1]
        vals.append(v if layer is None else v[layer])
        ses.append(s if layer is None else s[layer])
    v, s = np.asarray(vals), np.asarray(ses)
    design = np.stack([np.ones(len(WIDTHS)), 1.0 / np.asarray(WIDTHS)], axis=1)
    cov = np.linalg.inv(design.T @ (design / s[:, None] ** 2))
    intercept = (cov @ design.T @ (v / s**2))[0]
    assert intercept > MC_SIGMAS * np.sqrt(cov[0, 0]), (intercept, np.sqrt(cov[0, 0]))
    assert intercept > 0.5 * v[-1]  # the limit is most of what the widest network shows
    ntk_runs = _scaling_runs("ntk")
    widest = max(WIDTHS)
    ntk_value = np.asarray(getattr(ntk_runs[widest][1], field))[-1]
    ntk_value = ntk_value if layer is None else ntk_value[layer]
    assert vals[-1] > 3 * ntk_value  # far from the kernel regime at the widest width


# ----------------------------------------------------------------------------- at init
def test_initial_kurtosis_and_variance_match_perturbative(x64):
    """A bare ensemble at initialization: the measured kurtosis and metric variance agree with
    rgnn.perturbative within MC_SIGMAS standard errors on the random layer (layer 1 is
    deterministic: zero variance and kurtosis). One input: the kurtosis is a one-input
    quantity, and rgnn.perturbative's pair machinery is tested in its own suite."""
    x = np.random.RandomState(7).randn(1, 4)
    arch = rgnn.MLP(1, 32, "relu", weight_var=2.0)
    c_ens = _big_ensemble(arch, 4, 256, seed=8)
    c = rgnn.compare(arch, x, c_ens)
    assert c.steps.tolist() == [0] and np.all(np.isnan(c.gap))
    np.testing.assert_allclose(c.ntk_movement, 0.0)
    for meas, se, pred in (
        (c.kurtosis, c.kurtosis_se, c.kurtosis_predicted),
        (c.nngp_variance, c.nngp_variance_se, c.nngp_variance_predicted),
    ):
        meas, se, pred = np.asarray(meas), np.asarray(se), np.asarray(pred)
        np.testing.assert_allclose(meas[0], 0.0, atol=1e-12)
        z = np.abs(meas[1:] - pred[1:]) / se[1:]
        assert np.all(z <= MC_SIGMAS), z.max()
        assert np.all(pred[1:] > 4 * se[1:])  # the check has power
    # a result computed beforehand (with the NTK side too, as the sweep computes it once for
    # two measures) gives the same predictions
    given = rgnn.compare(arch, x, c_ens, perturbative=rgnn.perturbative(arch, x, warn=False))
    for name in ("kurtosis_predicted", "nngp_variance_predicted"):
        np.testing.assert_allclose(
            getattr(given, name), getattr(c, name), **tol(EXACT, jnp.float64)
        )


def test_compare_rejects_mismatches(x64):
    x, _ = rgnn.data.teacher_student(8, 4, seed=3)
    run = _scaling_runs("ntk")[32][0]
    arch = run.initial.arch
    with pytest.raises(ValueError, match="x: expected the training inputs"):
        rgnn.compare(arch, x[:5], run)
    with pytest.raises(ValueError, match="training: expected a training record of arch"):
        rgnn.compare(rgnn.MLP(2, 16, "tanh"), x, run)
    with pytest.raises(ValueError, match="training: expected an rgnn.Training"):
        rgnn.compare(arch, x, {"steps": 1})
    with pytest.raises(ValueError, match="arch: expected an rgnn.MLP"):
        rgnn.compare("mlp", x, run)
    # a perturbative result of other inputs or another architecture (checked before it is used)
    with pytest.raises(ValueError, match="perturbative: expected True, False or an rgnn.Pert"):
        rgnn.compare(arch, x, run, perturbative="yes")
    other = rgnn.perturbative(rgnn.MLP(1, 16, "relu", weight_var=2.0), x, ntk=False, warn=False)
    with pytest.raises(ValueError, match="perturbative: expected the result of rgnn.perturb"):
        rgnn.compare(arch, x, run, perturbative=other)
    fewer = dataclasses.replace(other, nngp=other.nngp[:, :2, :2])  # as if of two inputs
    with pytest.raises(ValueError, match="perturbative: expected a result on these inputs"):
        rgnn.compare(arch, x, run, perturbative=fewer)
