"""rgnn.train: bad input, divergence, the vmapped ensemble against a hand-written per-network
loop, and the muP initialization (multipliers, statistics, learning-rate factors)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from tests.tolerances import EXACT, MC_SIGMAS, tol


def _task():
    return rgnn.data.teacher_student(6, 3, seed=0)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    x, y = _task()
    labels = np.array([0, 1, 2, 0, 1, 2])
    base = dict(arch=rgnn.MLP(1, 8), x=x, y=y, steps=3, learning_rate=0.1)
    ce = dict(base, arch=rgnn.MLP(1, 8, out_dim=3), y=labels, loss="cross_entropy")
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    return {
        "y rows": (dict(base, y=y[:5]), "y: expected 6 targets"),
        "y outputs": (dict(base, y=np.ones((6, 2))), r"y: expected shape \[6, 1\]"),
        "x 1-D": (dict(base, x=x[:, 0]), "x: expected a 2-D array"),
        "x nan": (dict(base, x=x_nan), "x: expected finite values"),
        "x_test features": (dict(base, x_test=np.ones((2, 4))), "x_test: expected 3 features"),
        "labels float": (dict(ce, y=labels.astype(float)), "y: expected integer class labels"),
        "labels range": (dict(ce, y=labels + 1), r"y: expected labels in 0..2"),
        "ce one output": (dict(ce, arch=rgnn.MLP(1, 8)), "arch: expected out_dim >= 2"),
        "optimizer": (dict(base, optimizer="rmsprop"), "optimizer: expected one of"),
        "loss": (dict(base, loss="hinge"), "loss: expected one of"),
        "learning rate": (dict(base, learning_rate=0.0), "learning_rate: expected a finite"),
        "steps": (dict(base, steps=0), "steps: expected an integer >= 1"),
        "gd batch": (dict(base, batch_size=3), "batch_size: expected None for full-batch"),
        "batch size": (dict(base, optimizer="sgd", batch_size=7), "batch_size: expected an"),
        "record steps": (dict(base, record_steps=[5]), r"record_steps: expected steps in 0..3"),
        "networks": (dict(base, n_networks=0), "n_networks: expected an integer >= 1"),
        "arch": (dict(base, arch="mlp"), "arch: expected an rgnn.MLP"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_names_the_argument(case):
    kwargs, match = _bad_cases()[case]
    arch, x, y = kwargs.pop("arch"), kwargs.pop("x"), kwargs.pop("y")
    with pytest.raises(ValueError, match=match):
        rgnn.train(arch, x, y, key=jax.random.key(0), **kwargs)


def test_divergence_warns_with_step_and_rate_and_keeps_records(x64):
    x, y = _task()
    arch = rgnn.MLP(1, 8, "linear")  # no saturation, no dead units: a large rate blows up
    with pytest.warns(RuntimeWarning, match=r"diverged at step \d+.*learning_rate=20\.0"):
        run = rgnn.train(
            arch, x, y, steps=200, learning_rate=20.0, key=jax.random.key(0), record_kernels=False
        )
    assert run.diverged_at > 0
    assert np.all(np.asarray(run.steps) < run.diverged_at)
    assert np.all(np.isfinite(np.asarray(run.loss)))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(run.final.state))
    # the same run stopped one step earlier does not diverge: the step named is the first
    # whose loss is not finite (the loss after `diverged_at` updates)
    short = rgnn.train(
        arch,
        x,
        y,
        steps=run.diverged_at - 1,
        learning_rate=20.0,
        key=jax.random.key(0),
        record_kernels=False,
    )
    assert short.diverged_at == -1 and int(short.steps[-1]) == run.diverged_at - 1
    assert np.all(np.isfinite(np.asarray(short.loss)))


# ----------------------------------------------------------------------------- vmap vs loop
def _forward(arch, in_dim, params, x):
    """The network written out by hand from the multipliers of ``arch.scales``."""
    sc = arch.scales(in_dim)
    h = x
    for k, (w, b) in enumerate(params):
        z = sc.weight_multiplier[k] * (h @ w) + sc.bias_multiplier[k] * b[None, :]
        h = arch.act.fn(z) if k < arch.depth else z
    return h


def _loss(kind, out, y):
    if kind == "mse":
        return 0.5 * jnp.mean((out - y) ** 2)
    return jnp.mean(jax.nn.logsumexp(out, axis=-1) - out[jnp.arange(len(y)), y])


def _reference_run(run, arch, x, y, steps, optimizer, loss):
    """One network at a time, plain gradient descent / SGD / Adam written out."""
    sc = arch.scales(x.shape[1])
    lr_w = sc.weight_lr_adam if optimizer == "adam" else sc.weight_lr
    lr_b = sc.bias_lr_adam if optimizer == "adam" else sc.bias_lr
    grad = jax.jit(jax.grad(lambda p, xb, yb: _loss(loss, _forward(arch, x.shape[1], p, xb), yb)))
    outs = []
    for m in range(run.n_networks):
        net = run.initial.member(m)
        params = [(layer.w[...], layer.b[...]) for layer in net.layers]
        mom = [(jnp.zeros_like(w), jnp.zeros_like(b)) for w, b in params]
        vel = [(jnp.zeros_like(w), jnp.zeros_like(b)) for w, b in params]
        traj = [_forward(arch, x.shape[1], params, x)]
        for s in range(steps):
            if optimizer == "sgd":
                idx = rgnn.batch_indices(run.batch_key, s, x.shape[0], run.batch_size)
                xb, yb = x[np.asarray(idx)], y[np.asarray(idx)]
            else:
                xb, yb = x, y

            grads = grad(params, xb, yb)
            new = []
            for k, ((w, b), (gw, gb)) in enumerate(zip(params, grads, strict=True)):
                if optimizer == "adam":
                    b1, b2, eps = 0.9, 0.999, 1e-8
                    mw, mb = b1 * mom[k][0] + (1 - b1) * gw, b1 * mom[k][1] + (1 - b1) * gb
                    vw, vb = b2 * vel[k][0] + (1 - b2) * gw**2, b2 * vel[k][1] + (1 - b2) * gb**2
                    mom[k], vel[k] = (mw, mb), (vw, vb)
                    c1, c2 = 1 - b1 ** (s + 1), 1 - b2 ** (s + 1)
                    gw = (mw / c1) / (jnp.sqrt(vw / c2) + eps)
                    gb = (mb / c1) / (jnp.sqrt(vb / c2) + eps)
                eta = run.learning_rate
                new.append((w - eta * lr_w[k] * gw, b - eta * lr_b[k] * gb))
            params = new
            traj.append(_forward(arch, x.shape[1], params, x))
        outs.append(jnp.stack(traj))
    return jnp.stack(outs, axis=1)  # [steps + 1, M, N, C]


CASES = {
    "gd-ntk-mse": dict(optimizer="gd", parameterization="ntk", loss="mse"),
    "sgd-standard-ce": dict(optimizer="sgd", parameterization="standard", loss="cross_entropy"),
    "adam-mup-mse": dict(optimizer="adam", parameterization="mup", loss="mse"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vmapped_ensemble_equals_per_network_loop(case, x64):
    """Every member's outputs at every recorded step equal a hand-written single-network loop
    (forward pass from the multipliers, the optimizer's update rule, the per-group rates)."""
    cfg = CASES[case]
    x, y = _task()
    out_dim = 3 if cfg["loss"] == "cross_entropy" else 1
    if out_dim == 3:
        y = np.array([0, 1, 2, 2, 1, 0])
    arch = rgnn.MLP(
        2, 8, "tanh", bias_var=0.1, parameterization=cfg["parameterization"], out_dim=out_dim
    )
    lr = {"gd": 0.3, "sgd": 0.05, "adam": 0.01}[cfg["optimizer"]]
    run = rgnn.train(
        arch,
        x,
        y,
        record_kernels=False,
        steps=4,
        learning_rate=lr,
        optimizer=cfg["optimizer"],
        loss=cfg["loss"],
        n_networks=2,
        key=jax.random.key(7),
        record_steps=[2, 4],
        batch_size=4 if cfg["optimizer"] == "sgd" else None,
        x_test=x[:2] * 0.5,
    )
    ref = _reference_run(run, arch, x, y, 4, cfg["optimizer"], cfg["loss"])
    np.testing.assert_allclose(run.outputs, ref[np.asarray(run.steps)], **tol(EXACT, x.dtype))
    final = jax.vmap(lambda s: _forward(arch, 3, _params(run.final, s), x[:2] * 0.5))(
        run.final.state
    )
    np.testing.assert_allclose(run.test_outputs[-1], final, **tol(EXACT, x.dtype))
    losses = [[_loss(cfg["loss"], o, y) for o in out] for out in run.outputs]
    np.testing.assert_allclose(run.loss, np.array(losses), **tol(EXACT, x.dtype))
    assert run.outputs.dtype == jnp.float64


def _params(ens, state):
    return [(layer.w[...], layer.b[...]) for layer in _merge(ens, state).layers]


# ----------------------------------------------------------------------------- muP init
def test_mup_is_ntk_with_a_smaller_output_multiplier(x64):
    """Same key: muP's hidden preactivations equal NTK's, its output is NTK's divided by
    sqrt(n_L) (no biases), its output NTK equals NTK's and its hidden NTKs are n times NTK's
    (the abc-symmetry with theta = 1/2, architecture docstring)."""
    x = np.random.RandomState(2).randn(4, 3)
    n = 8
    kw = dict(activation="gelu", weight_var=1.7, bias_var=0.0)
    ens = {
        p: rgnn.ensemble(
            rgnn.MLP(2, n, parameterization=p, **kw), 3, n_networks=2, key=jax.random.key(3)
        )
        for p in ("ntk", "mup")
    }
    z = {
        p: jax.vmap(lambda s, e=e: rgnn.MLPNetwork.preactivations(_merge(e, s), x))(e.state)
        for p, e in ens.items()
    }
    for layer in range(2):
        np.testing.assert_allclose(z["mup"][layer], z["ntk"][layer], **tol(EXACT, x.dtype))
    np.testing.assert_allclose(z["mup"][2] * math.sqrt(n), z["ntk"][2], **tol(EXACT, x.dtype))
    t = {p: rgnn.empirical_ntk(e, x) for p, e in ens.items()}
    np.testing.assert_allclose(t["mup"][:, 2], t["ntk"][:, 2], **tol(EXACT, x.dtype))
    np.testing.assert_allclose(t["mup"][:, :2], n * t["ntk"][:, :2], **tol(EXACT, x.dtype))


def _merge(ens, state):
    from flax import nnx

    return nnx.merge(ens.graphdef, state)


def test_mup_weight_statistics_and_adam_targets(x64):
    """The effective weights a_W w of a muP network have variance C_W^(l) / n_{l-1} (within
    MC_SIGMAS standard errors over their entries), and the Adam factors make one Adam step
    (which moves every parameter by its learning rate) move the effective weights as TP V
    prescribes: O(1) for input weights, 1/fan_in for hidden and output weights."""
    arch = rgnn.MLP(2, 256, weight_var=2.0, bias_var=0.3, parameterization="mup")
    net = arch.network(6, rngs=__import__("flax").nnx.Rngs(0))
    sc = arch.scales(6)
    dims = arch.layer_dims(6)
    for k, layer in enumerate(net.layers):
        w = np.asarray(sc.weight_multiplier[k] * layer.w[...]).ravel()
        expect = sc.weight_var[k] / dims[k]
        se = expect * math.sqrt(2 / w.size)
        assert abs(w.var() - expect) <= MC_SIGMAS * se, (k, w.var(), expect)
    assert sc.weight_var[:2] == pytest.approx((2.0, 2.0)) and sc.weight_var[2] == pytest.approx(
        2.0 / 256
    )
    assert sc.bias_var == pytest.approx((0.3, 0.3, 0.3))
    # |Delta W| of an Adam step is eta * factor * multiplier; times the TP V width scaling it
    # must not depend on the width
    for n in (64, 256):
        s = rgnn.MLP(2, n, parameterization="mup").scales(6)
        moves = [a * f for a, f in zip(s.weight_multiplier, s.weight_lr_adam, strict=True)]
        assert moves[0] == pytest.approx(math.sqrt(1.0 / 6))  # input: O(1)
        assert moves[1] * n == pytest.approx(1.0)  # hidden: 1 / fan_in
        assert moves[2] * n == pytest.approx(1.0)  # output: 1 / fan_in
        assert s.weight_lr == (1.0, 1.0, 1.0) and s.bias_lr == (1.0, 1.0, 1.0)


def test_mup_has_no_infinite_width_kernels():
    arch = rgnn.MLP(2, 16, parameterization="mup")
    with pytest.raises(ValueError, match="parameterization: 'mup' has no infinite-width"):
        rgnn.fixed_point(arch, np.ones((2, 3)))
    with pytest.raises(ValueError, match="parameterization: neural-tangents has no 'mup'"):
        arch.stax()
