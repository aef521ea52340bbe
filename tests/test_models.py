"""Any architecture on the Gaussian side (rgnn.models): stax triples, the CNN family, flax models.

Exactness checks (EXACT, float64): the Jacobian-free NTK against ``jax.jacobian``'s, the CNN's
structural kernels and forward pass against the generic ones and neural-tangents' own; the
pipeline on small widths; bad input as one ValueError naming what is unsupported.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgnn
from rgnn import models
from tests.tolerances import EXACT, tol


def _digits(n):
    x, labels = rgnn.data.digits(n)
    return jnp.asarray(x), np.where(labels % 2 == 0, 1.0, -1.0)[:, None]


def _stax():
    return rgnn.import_neural_tangents().stax


# ----------------------------------------------------------------------------- kernels
def test_jvp_ntk_equals_jacobian_ntk_on_a_conv_triple(x64):
    stax = _stax()
    triple = stax.serial(
        stax.Conv(3, (3, 3), padding="SAME", W_std=1.3, b_std=0.2),
        stax.Erf(),
        stax.Flatten(),
        stax.Dense(2, W_std=1.1, b_std=0.3),
    )
    m = models.StaxModel(*triple, input_shape=(8, 8, 1))
    x, _ = _digits(6)
    params = m.init(jax.random.key(0), x)
    for unit in (0, 1):

        def f(p, z, unit=unit):
            return m.apply(p, z)[:, unit]

        ref = models.ntk_jacobian(f, params, x, x[:4])
        np.testing.assert_allclose(
            m.empirical_ntk(params, x, x[:4], unit), ref, **tol(EXACT, x.dtype)
        )
    assert m.empirical_ntk(params, x, x[:4]).dtype == jnp.float64


@pytest.mark.parametrize("bias_var", [0.0, 0.2])
def test_cnn_forward_and_structural_kernels_are_exact(x64, bias_var):
    m = models.cnn(3, depth=2, bias_var=bias_var)
    x, _ = _digits(5)
    params = m.init(jax.random.key(1), x)
    init_fn, apply_fn, kernel_fn = m.stax()
    t = tol(EXACT, x.dtype)
    # the patches-times-matrix forward pass is neural-tangents' convolutional network
    np.testing.assert_allclose(m.apply(params, x), apply_fn(params, x.reshape(-1, 8, 8, 1)), **t)

    def f(p, z):
        return m.apply(p, z)[:, 0]

    np.testing.assert_allclose(
        m.empirical_ntk(params, x, x[:3]), models.ntk_jacobian(f, params, x, x[:3]), **t
    )
    # the exact readout metric equals the generic estimate: the variance-weighted readout NTK
    generic = models.StaxModel(
        init_fn,
        apply_fn,
        kernel_fn,
        input_shape=(8, 8, 1),
        readout_var=(1.0, 1.0) if bias_var else (1.0,),
    )
    np.testing.assert_allclose(
        m.empirical_nngp(params, x, x[:3]), generic.empirical_nngp(params, x, x[:3]), **t
    )


def test_output_not_affine_in_the_last_group_has_no_metric(x64):
    stax = _stax()
    m = models.StaxModel(*stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1), stax.Erf()))
    x, _ = _digits(4)
    params = m.init(jax.random.key(0), x)
    assert np.all(np.isnan(m.empirical_nngp(params, x, x)))


def test_triple_fixed_point_is_the_output_layer_of_the_mlp(x64):
    arch = rgnn.MLP(2, 64, "relu", weight_var=2.0, bias_var=0.1)
    x, _ = _digits(8)
    fp = rgnn.fixed_point(arch.stax(), x)
    # the same kernel_fn as the neural_tangents backend (whose relu diagonal is off the exact
    # native one by up to 1e-8: neural-tangents' arc-cosine at correlation 1)
    ref = rgnn.fixed_point(arch, x, backend="neural_tangents")
    assert fp.nngp.shape == (1, 8, 8) and fp.backend == "model" and fp.quadrature_error is None
    np.testing.assert_allclose(fp.nngp[-1], ref.nngp[-1], **tol(EXACT, x.dtype))
    np.testing.assert_allclose(fp.ntk[-1], ref.ntk[-1], **tol(EXACT, x.dtype))
    np.testing.assert_allclose(fp.nngp_diag1[-1], ref.nngp_diag1[-1], **tol(EXACT, x.dtype))


# ----------------------------------------------------------------------------- the pipeline
def test_cnn_sweep_table_verdict_and_resume(tmp_path):
    # 4 networks: the sweep asks for O(1/n) predictions from 4 networks on, which a CNN has not
    x, y = _digits(8)
    kw = dict(widths=[2, 4], seeds=[0], steps=3, n_networks=4, learning_rates=[0.5], plots=False)
    s = rgnn.sweep(models.cnn(2, depth=1), x, y, out=tmp_path, progress=False, **kw)
    rows = s.table()
    assert [r["width"] for r in rows] == [2, 4]
    for name in ("ntk_movement", "function_gap", "ntk_distance", "nngp_distance", "kurtosis"):
        assert all(math.isfinite(r[name]) for r in rows), name
    # no 1/n rules for a CNN: measured, not predicted
    assert "kurtosis_predicted" not in rows[0] and "ntk_fluctuation_predicted" not in rows[0]
    assert s.config["base"]["model"] == "cnn"
    assert rgnn.classify(s).label in rgnn.regime.LABELS
    assert (tmp_path / "table.csv").exists()
    again = rgnn.sweep(models.cnn(2, depth=1), x, y, out=tmp_path, progress=False, **kw)
    assert [r["seconds"] for r in again.records] == [r["seconds"] for r in s.records]


# the slow tier (the suite's time, 32 s): tests/test_end_of_training.py keeps the gate and the
# linear residual prediction's sweep path in the default run
@pytest.mark.slow
def test_residual_point_with_predictions_on_asks_only_for_derived_statistics(x64):
    """Trained residual MLPs judged with predictions on (4 networks): a linear one has the
    kurtosis, the NTK fluctuation and the end-of-training prediction (its flow is exact on any
    inputs, dNTK and ddNTK included); a relu one on several inputs has the kurtosis and the NTK
    fluctuation (the pair flow of rgnn._residual_multi) but not the end-of-training prediction
    (no full layout for a kinked residual MLP, and a kinked trained departure is not 1/n), the
    sweep says why, and no ValueError from rgnn.perturbative stops it. A smooth one gets the
    prediction: test_smooth_residual_point_gets_the_end_of_training_prediction (slow)."""
    x, y = _digits(4)
    arch = rgnn.MLP(2, 4, "linear", shortcut=0.5, branch=0.8)
    regime = rgnn.classify(arch, x, y, steps=2, n_networks=4, learning_rate=0.1)
    predicted = {e.measure: e.predicted for e in regime.evidence}
    assert math.isfinite(predicted["kurtosis"]) and math.isfinite(predicted["ntk_fluctuation"])
    assert regime.trained_prediction.startswith("applies")
    arch = rgnn.MLP(2, 4, "relu", shortcut=0.5, branch=0.8)
    regime = rgnn.classify(arch, x, y, steps=2, n_networks=4, learning_rate=0.1)
    predicted = {e.measure: e.predicted for e in regime.evidence}
    assert math.isfinite(predicted["kurtosis"]) and math.isfinite(predicted["ntk_fluctuation"])
    assert "residual MLP with the kinked activation 'relu'" in regime.trained_prediction


@pytest.mark.slow
def test_smooth_residual_point_gets_the_end_of_training_prediction(x64):
    """A tanh residual MLP judged with predictions on: the sweep computes its end-of-training
    prediction (rgnn.perturbative's full layout of a smooth residual MLP) and holds the
    measured NTK movement against it (a finite prediction)."""
    x, y = _digits(3)  # with the probe input: one four-input set
    arch = rgnn.MLP(2, 4, "tanh", shortcut=0.5, branch=0.8)
    regime = rgnn.classify(arch, x, y, steps=2, n_networks=4, learning_rate=0.1)
    assert regime.trained_prediction.startswith("applies"), regime.trained_prediction
    predicted = {e.measure: e.predicted for e in regime.evidence}
    assert math.isfinite(predicted["mean_ntk_movement"])


def test_sweep_of_a_function_from_width_to_triple():
    stax = _stax()
    x, y = _digits(6)

    def family(n):
        return stax.serial(stax.Dense(n, W_std=1.5), stax.Erf(), stax.Dense(1, W_std=1.5))

    s = rgnn.sweep(family, x, y, widths=[3, 6], seeds=[0], steps=2, n_networks=2, progress=False)
    assert s.config["base"]["model"] == "stax" and len(s.records) == 2
    # the readout metric exists (a Dense readout), so every measure is finite
    assert all(math.isfinite(v["value"]) for r in s.records for v in r["measures"].values())


def test_custom_activation_sweeps_and_resumes(tmp_path):
    x, y = _digits(8)
    kw = dict(widths=[4, 8], seeds=[0], steps=2, n_networks=2, predict=False, plots=False)
    kw.update(out=tmp_path, progress=False)
    s = rgnn.sweep(rgnn.MLP(1, 4, lambda z: jnp.tanh(z)), x, y, **kw)
    (label,) = s.config["activations"]
    assert label.startswith("custom:<lambda>@")
    # another object computing the same function resumes; a different function with the same
    # name gets another label, so its points are computed, never taken from the first's
    again = rgnn.sweep(rgnn.MLP(1, 4, lambda z: jnp.tanh(z)), x, y, **kw)
    assert [r["seconds"] for r in again.records] == [r["seconds"] for r in s.records]
    other = rgnn.sweep(rgnn.MLP(1, 4, lambda z: jnp.sin(z)), x, y, **kw)
    (label2,) = set(other.config["activations"]) - {label}  # the folder is extended
    assert label2.startswith("custom:<lambda>@")
    new = {r["key"] for r in other.records if r["point"]["activation"] == label2}
    assert len(new) == 2 and not new & {r["key"] for r in s.records}


class _Net(nnx.Module):
    def __init__(self, width, *, rngs):
        self.hidden = nnx.Linear(64, width, rngs=rngs)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_flax_model_kernels_training_and_comparison(x64):
    x, y = _digits(6)
    net = _Net(16, rngs=nnx.Rngs(0))
    h = net.hidden(x)
    np.testing.assert_allclose(
        rgnn.empirical_nngp(net, x, layer="hidden")[0], h @ h.T / 16, **tol(EXACT, x.dtype)
    )
    m = models.FlaxModel(net)
    params = m.init(jax.random.key(0), x)

    def f(p, z):
        return m.apply(p, z)[:, 0]

    np.testing.assert_allclose(
        rgnn.empirical_ntk(net, x)[0], models.ntk_jacobian(f, params, x, x), **tol(EXACT, x.dtype)
    )

    def reference(x1, x2):  # the user's kernel (here: a stand-in, the initial empirical NTK)
        return None, models.ntk_jacobian(f, params, x1, x1 if x2 is None else x2)

    family = models.FlaxModel(_Net, reference_fn=reference, width=16)
    run = rgnn.train(family, x, y, steps=3, learning_rate=0.1, n_networks=2, key=jax.random.key(1))
    assert run.ntk.shape == (4, 2, 1, 6, 6) and bool(jnp.all(jnp.isnan(run.nngp)))
    with pytest.warns(UserWarning, match="names no readout"):  # the NaN says why
        cmp = rgnn.compare(family, x, run)
    assert cmp.ntk_distance.shape == (4, 1) and bool(jnp.all(jnp.isfinite(cmp.ntk_distance)))
    assert bool(jnp.all(jnp.isnan(cmp.nngp_distance)))

    # with the readout named, the output metric exists and compare fills the NNGP fields
    named = models.FlaxModel(_Net, reference_fn=reference, width=16, readout="out")
    run = rgnn.train(named, x, y, steps=3, learning_rate=0.1, n_networks=2, key=jax.random.key(1))
    assert bool(jnp.all(jnp.isfinite(run.nngp)))
    cmp = rgnn.compare(named, x, run)  # (the reference here has no NNGP: no distance to it)
    assert bool(jnp.all(jnp.isfinite(cmp.kurtosis))) and cmp.kurtosis.shape == (1, 6)


def test_flax_readout_metric_is_the_readout_kernel(x64):
    """The output metric of a named readout is ``s_W h h^T + s_b`` exactly (given variances);
    estimated variances of nnx.Linear's default init (bias 0, kernel 1 / fan_in) within 4
    standard errors; a readout the output is not affine in is NaN; bad names are one error."""
    x, _ = _digits(6)
    width, s_b, s_w = 16, 0.1, 1 / 16
    m = models.FlaxModel(_Net, width=width, readout="out", readout_var=(s_b, s_w))
    params = m.init(jax.random.key(3), x)
    net = nnx.merge(m._split[0], params, m._split[2])
    h = nnx.relu(net.hidden(x))
    np.testing.assert_allclose(
        m.empirical_nngp(params, x, x[:4]), s_w * h @ h[:4].T + s_b, **tol(EXACT, x.dtype)
    )
    est = models.FlaxModel(_Net, width=width, readout="out")._readout_variances(params, x.dtype)
    assert float(est[0]) == 0.0  # the bias starts at zero in every draw
    # mean of w^2 over VARIANCE_DRAWS * width entries of variance 1/width: its standard error
    # is at most sqrt(2 / count) / width (the truncated normal's fourth moment is below 3 s^2)
    se = math.sqrt(2 / (models.VARIANCE_DRAWS * width)) / width
    assert abs(float(est[1]) - 1 / width) <= 4 * se
    # relu is positively homogeneous: the hidden layer passes f(2p) + f(0) = 2 f(p), not
    # f(p) + f(-p) = 2 f(0)
    hidden = models.FlaxModel(_Net, width=width, readout="hidden")
    assert bool(jnp.all(jnp.isnan(hidden.empirical_nngp(params, x, x))))
    with pytest.raises(ValueError, match="no parameters under 'nope'"):
        models.FlaxModel(_Net, width=width, readout="nope").empirical_nngp(params, x, x)
    with pytest.raises(ValueError, match="expected 2 variances"):
        models.FlaxModel(_Net, width=width, readout="out", readout_var=(1.0,)).empirical_nngp(
            params, x, x
        )
    with pytest.raises(ValueError, match="without readout"):
        models.FlaxModel(_Net, width=width, readout_var=(0.0, 1.0))


# ----------------------------------------------------------------------------- bad input
def test_unsupported_architectures_raise_one_value_error(x64):
    stax = _stax()
    x, y = _digits(4)
    triple = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    with pytest.raises(ValueError, match="no 1/n rules for a neural-tangents stax triple"):
        rgnn.perturbative(triple, x)
    with pytest.raises(ValueError, match="no 1/n rules"):
        rgnn.measure(triple, x, n_networks=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="not all callable"):
        rgnn.fixed_point((1, 2, 3), x)
    with pytest.raises(ValueError, match="not one network"):
        rgnn.empirical_ntk(triple, x)
    with pytest.raises(ValueError, match="family of widths"):
        rgnn.sweep(triple, x, y, widths=[2, 4])

    def no_ntk(x1, x2=None, get=None, **kw):
        if get is None or "ntk" in (get if isinstance(get, tuple) else (get,)):
            raise NotImplementedError("this layer has no NTK")
        return triple[2](x1, x2, get, **kw)

    lacking = (triple[0], triple[1], no_ntk)
    fp = rgnn.fixed_point(lacking, x)
    assert bool(jnp.all(jnp.isnan(fp.ntk))) and bool(jnp.all(jnp.isfinite(fp.nngp)))
    run = rgnn.train(lacking, x, y, steps=1, learning_rate=0.1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="has no infinite-width NTK"):
        rgnn.compare(lacking, x, run)

    class Flat(nnx.Module):  # output [N], not [N, out_dim]
        def __init__(self, *, rngs):
            self.lin = nnx.Linear(64, 1, rngs=rngs)

        def __call__(self, z):
            return self.lin(z)[:, 0]

    with pytest.raises(ValueError, match=r"to \[N, out_dim\] outputs"):
        rgnn.train(Flat(rngs=nnx.Rngs(0)), x, y, steps=1, learning_rate=0.1, key=jax.random.key(0))
    # a flax module that cannot take the inputs: one line, not flax's shape error
    with pytest.raises(ValueError, match=r"does not run on inputs of shape \(4, 10\)"):
        rgnn.empirical_ntk(_Net(4, rngs=nnx.Rngs(0)), x[:, :10])
    # a layer without a kernel rule anywhere in the triple: named, not a traceback
    init_fn, apply_fn, _ = stax.Relu()

    def no_rule(k, **kw):
        raise NotImplementedError("no kernel rule for this layer")

    ruleless = stax.serial(stax.Dense(8), (init_fn, apply_fn, no_rule), stax.Dense(1))
    with pytest.raises(ValueError, match="computes neither the NNGP nor the NTK"):
        rgnn.fixed_point(ruleless, x)
    with pytest.raises(ValueError, match="expected an rgnn.MLP"):
        rgnn.end_of_training(triple, x, y, x[:1], learning_rate=0.1)
    with pytest.raises(ValueError, match="expected an rgnn.MLP"):
        rgnn.sharding.sharded_fixed_point(triple, x)


def test_sharded_kernels_of_a_model_ensemble_equal_one_device(x64):
    """rgnn.sharding maps ensembles of any model, not only of an MLP (the model path's VJPs
    inside shard_map)."""
    stax = _stax()
    x, _ = _digits(5)
    triple = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    ens = rgnn.ensemble(triple, 64, n_networks=3, key=jax.random.key(0))
    for kind, f in (("nngp", rgnn.empirical_nngp), ("ntk", rgnn.empirical_ntk)):
        np.testing.assert_allclose(
            rgnn.sharding.sharded_empirical(ens, x, kind=kind), f(ens, x), **tol(EXACT, x.dtype)
        )


def test_load_npz_errors_are_one_line(tmp_path):
    x = np.random.RandomState(0).randn(5, 3)
    good = tmp_path / "good.npz"
    np.savez(good, x=x, y=np.arange(5), x_test=x[:2])
    gx, gy, gt = rgnn.data.load_npz(good)
    assert gx.shape == (5, 3) and gy.shape == (5,) and gt.shape == (2, 3)
    cases = {
        "no such file": tmp_path / "missing.npz",
        "no array 'y'": dict(x=x),
        "must be \\[N, n_0\\]": dict(x=x[0], y=np.arange(5)),
        "must be \\[5\\] or \\[5, C\\]": dict(x=x, y=np.arange(4)),
        "NaN or inf": dict(x=np.where(x > 1, np.nan, x), y=np.arange(5)),
        "not numeric": dict(x=x, y=np.array(list("abcde"))),
        "x_test .* must be": dict(x=x, y=np.arange(5), x_test=x[:, :2]),
    }
    for i, (message, content) in enumerate(cases.items()):
        path = content if not isinstance(content, dict) else tmp_path / f"c{i}.npz"
        if isinstance(content, dict):
            np.savez(path, **content)
        with pytest.raises(ValueError, match=message):
            rgnn.data.load_npz(path)
    bad = tmp_path / "text.npz"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        rgnn.data.load_npz(bad)


def test_cli_data_file(tmp_path, capsys):
    from rgnn.cli import main

    x, labels = rgnn.data.digits(12)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=labels)
    rc = main(
        ["fixed-point", "--depth", "1", "--data", str(path), "--out", str(tmp_path), "--json"]
    )
    assert rc == 0 and '"n_inputs": 12' in capsys.readouterr().out
    for cmd in ("sweep", "classify", "fixed-point", "wilsonian"):
        # classify reads a saved sweep unless --width asks it to train one configuration
        extra = ["--width", "4"] if cmd == "classify" else []
        args = [cmd, *extra, "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / cmd)]
        rc = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no such file" in err[0], (cmd, err)
        assert not (tmp_path / cmd).exists()
