"""Monte Carlo check of :func:`rgnn.end_of_training` against trained networks.

For each width, ``--networks`` networks (antithetic pairs: the second of each pair has its
output layer's sign flipped, ``f -> -f`` at initialization) are trained by full-batch gradient
descent exactly as :func:`rgnn.train` trains them (``loss="mse"``, ``optimizer="gd"``; checked
against it by ``--self-check``). Each network's own infinite-width linearized trajectory
(kernel gradient descent with the fixed-point NTK from the network's own initial outputs,
whose ensemble mean is ``mean`` exactly) is subtracted as a control variate. The departure
``n (E[f_T(x_test)] - mean)`` and the NTK change ``n E[Theta_T - Theta_0]`` are fitted across
widths as ``c + d / n`` (weighted by their standard errors) and ``c`` is compared with the
predicted ``n * correction`` and ``n * ntk_change``.

Residual MLPs (PDLT appendix B): ``--shortcut`` and ``--branch`` take one number (every
residual layer) or ``depth - 1`` comma-separated numbers (layers ``2..L``), as
:class:`rgnn.MLP`'s ``shortcut=`` and ``branch=``. ``--in-dim`` sets the input dimension
``n_0``: for a linear activation the network is an affine map, whose trained test outputs are
fixed by the targets when ``N >= n_0 + 1`` (then every width predicts the same and the check
is empty): take ``n_0 > N``.

Usage::

    python tools/end_of_training_mc.py --activation tanh --depth 2 --widths 32,64,128,256 \
        --networks 4096 --steps 100 --out result.json
    python tools/end_of_training_mc.py --activation linear --depth 3 --shortcut 0.8 \
        --branch 0.6 --in-dim 6 --widths 16,32,64 --networks 2048
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rgnn


def problem(n_train: int, n_test: int, in_dim: int, seed: int):
    """Fixed inputs on the sphere of radius ``sqrt(n_0)`` and smooth targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, in_dim))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(in_dim)
    y = np.sin(x[:n_train, :1]) + 0.5 * x[:n_train, 1:2]
    return x[:n_train], y, x[n_train:]


def flip_output(ens: rgnn.Ensemble) -> rgnn.Ensemble:
    """The ensemble with every output-layer parameter negated (``f -> -f``)."""
    last = ens.arch.n_layers - 1

    def flip(path, leaf):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        return -leaf if last in keys else leaf

    return rgnn.Ensemble(
        jax.tree_util.tree_map_with_path(flip, ens.state), ens.graphdef, ens.arch, ens.in_dim
    )


def make_trainer(graphdef, steps: int):
    """Full-batch gradient descent on ``0.5 mean((f - y)^2)``, every factor 1 (NTK
    parameterization), vmapped over the ensemble axis; as :func:`rgnn.train`."""

    @jax.jit
    def run(state, x, y, eta):
        def loss(s):
            return 0.5 * jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)

        def one(s):
            def body(_, s):
                g = jax.grad(loss)(s)
                return jax.tree_util.tree_map(lambda p, d: p - eta * d, s, g)

            return jax.lax.fori_loop(0, steps, body, s)

        return jax.vmap(one)(state)

    return run


def outputs(ens: rgnn.Ensemble, x):
    """``[M, N, C]`` outputs of every member."""
    return jax.jit(jax.vmap(lambda s: nnx.merge(ens.graphdef, s)(x)))(ens.state)


def self_check(arch, x, y, eta, steps):
    """The trainer here equals :func:`rgnn.train` on one small ensemble (max abs diff)."""
    key = jax.random.key(3)
    run = rgnn.train(
        arch,
        x,
        y,
        steps=steps,
        learning_rate=eta,
        n_networks=4,
        key=key,
        record_kernels=False,
        record_steps=[steps],
    )
    ens = rgnn.ensemble(
        arch, x.shape[1], n_networks=4, key=jax.random.fold_in(key, 0), dtype=x.dtype
    )
    state = make_trainer(ens.graphdef, steps)(ens.state, x, y, eta)
    mine = outputs(rgnn.Ensemble(state, ens.graphdef, arch, ens.in_dim), x)
    return float(jnp.max(jnp.abs(mine - run.outputs[-1])))


def kernel_gd(k, z0, y, e, steps, ntr):
    """Test outputs after ``steps`` steps of kernel gradient descent with kernel ``k``
    (``[M, N+N*, N+N*]`` or ``[N+N*, N+N*]``) from initial outputs ``z0`` (``[M, N+N*]``)."""
    k = jnp.broadcast_to(k, z0.shape[:1] + k.shape[-2:])
    lam, v = jnp.linalg.eigh(k[:, :ntr, :ntr])
    filt = (1 - (1 - e * lam) ** steps) / lam  # [M, ntr]
    resid = jnp.einsum("mab,ma->mb", v, y[None] - z0[:, :ntr])
    return z0[:, ntr:] + jnp.einsum("mta,mab,mb->mt", k[:, ntr:, :ntr], v, filt * resid)


def measure(arch, x_tr, y, x_te, *, eta, steps, n_networks, n_init, chunk, seed, theta):
    """Per-pair estimates of the test-output departure and of the NTK change.

    Two stages, each over antithetic pairs: trained networks give ``f_T - z^elin_T`` (``z^elin``
    the kernel-GD trajectory with the network's own initial NTK: the two differ by O(1/n) per
    network), and ``n_init`` untrained networks give ``z^elin_T - z^lin_T`` (``z^lin`` with the
    fixed-point NTK, whose mean is ``mean`` exactly). Returns the two residual arrays
    ``[pairs, N*]`` and the NTK changes ``[pairs, N+N*, N+N*]``."""
    x_all = jnp.concatenate([x_tr, x_te])
    ntr = x_tr.shape[0]
    e = eta / (ntr * arch.out_dim)
    yv = y[:, 0]
    trainer = None
    stage1, stage2, dntk = [], [], []

    def draw(count, offset):
        ens = rgnn.ensemble(
            arch,
            x_tr.shape[1],
            n_networks=count,
            key=jax.random.fold_in(jax.random.key(seed), offset),
            dtype=x_tr.dtype,
        )
        return [ens, flip_output(ens)]

    for start in range(0, n_networks, chunk):
        half = min(chunk, n_networks - start) // 2
        pair = draw(half, start)
        if trainer is None:
            trainer = make_trainer(pair[0].graphdef, steps)
        r_pair, d_pair = [], []
        for member in pair:
            z0 = outputs(member, x_all)[..., 0]
            k0 = rgnn.empirical_ntk(member, x_all)[:, -1]
            state = trainer(member.state, x_tr, y, eta)
            fin = rgnn.Ensemble(state, member.graphdef, arch, member.in_dim)
            zt = outputs(fin, x_te)[..., 0]
            kt = rgnn.empirical_ntk(fin, x_all)[:, -1]
            r_pair.append(zt - kernel_gd(k0, z0, yv, e, steps, ntr))
            d_pair.append(kt - k0)
        stage1.append(0.5 * (r_pair[0] + r_pair[1]))
        dntk.append(0.5 * (d_pair[0] + d_pair[1]))
    for start in range(0, n_init, chunk):
        half = min(chunk, n_init - start) // 2
        r_pair = []
        for member in draw(half, 10**7 + start):
            z0 = outputs(member, x_all)[..., 0]
            k0 = rgnn.empirical_ntk(member, x_all)[:, -1]
            r_pair.append(
                kernel_gd(k0, z0, yv, e, steps, ntr) - kernel_gd(theta, z0, yv, e, steps, ntr)
            )
        stage2.append(0.5 * (r_pair[0] + r_pair[1]))
    return np.concatenate(stage1), np.concatenate(stage2), np.concatenate(dntk)


def fit(widths, values, ses):
    """Weighted least squares ``n * value = c + d / n``: ``(c, se_c, d, chi2/dof)``."""
    n = np.asarray(widths, float)
    yv, sv = n * np.asarray(values), n * np.asarray(ses)
    a = np.stack([np.ones_like(n), 1 / n], axis=1) / sv[:, None]
    b = yv / sv
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    cov = np.linalg.inv(a.T @ a)
    chi2 = float(np.sum((a @ coef - b) ** 2))
    dof = max(len(n) - 2, 1)
    return float(coef[0]), float(np.sqrt(cov[0, 0])), float(coef[1]), chi2 / dof


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--widths", default="32,64,128,256")
    ap.add_argument("--networks", type=int, default=2048, help="networks per width (even)")
    ap.add_argument(
        "--init-factor",
        type=int,
        default=16,
        help="untrained networks per trained one (second stage)",
    )
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument(
        "--stability",
        type=float,
        default=1.0,
        help="e * lambda_max of the training NTK (sets the learning rate)",
    )
    ap.add_argument("--n-train", type=int, default=4)
    ap.add_argument("--n-test", type=int, default=2)
    ap.add_argument("--in-dim", type=int, default=3, help="input dimension n_0")
    ap.add_argument("--bias-var", type=float, default=0.1)
    ap.add_argument(
        "--shortcut",
        default=None,
        help="residual shortcut gamma: one number or depth-1 comma-separated (default: plain)",
    )
    ap.add_argument(
        "--branch",
        default=None,
        help="residual branch xi: one number or depth-1 comma-separated (default 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        print(f"--widths: expected comma-separated integers, got {args.widths!r}", file=sys.stderr)
        return 2
    residual = {}
    for name in ("shortcut", "branch"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            print(
                f"--{name}: expected a number or comma-separated numbers, got {text!r}",
                file=sys.stderr,
            )
            return 2
        residual[name] = vals[0] if len(vals) == 1 else vals
    if args.in_dim < 1:
        print(f"--in-dim: expected an integer >= 1, got {args.in_dim}", file=sys.stderr)
        return 2
    try:
        rgnn.MLP(args.depth, widths[0], activation=args.activation, **residual)
    except ValueError as err:
        print(f"{err}", file=sys.stderr)
        return 2
    jax.config.update("jax_enable_x64", True)
    x_tr, y, x_te = problem(args.n_train, args.n_test, args.in_dim, args.seed)
    x_tr, y, x_te = (jnp.asarray(a) for a in (x_tr, y, x_te))

    def arch_of(w):
        return rgnn.MLP(
            args.depth, w, activation=args.activation, bias_var=args.bias_var, **residual
        )

    t0 = time.time()
    x_all = jnp.concatenate([x_tr, x_te])
    theta0 = np.asarray(rgnn.fixed_point(arch_of(widths[0]), x_all).ntk[-1])
    lam_max = float(np.linalg.eigvalsh(theta0[: args.n_train, : args.n_train])[-1])
    eta = args.stability * args.n_train / lam_max
    theory = rgnn.end_of_training(
        arch_of(widths[0]), x_tr, y, x_te, learning_rate=eta, steps=args.steps
    )
    t_theory = time.time() - t0
    if args.self_check:
        print(
            "self-check (max |trainer - rgnn.train|):",
            self_check(arch_of(widths[0]), x_tr, y, eta, 5),
        )
    n0 = widths[0]
    pred = np.asarray(theory.correction[:, 0]) * n0
    pred_k = np.asarray(theory.ntk_change) * n0
    t1 = time.time()
    means, ses, kmeans, kses = [], [], [], []
    for w in widths:
        r1, r2, dk = measure(
            arch_of(w),
            x_tr,
            y,
            x_te,
            eta=eta,
            steps=args.steps,
            n_networks=args.networks,
            n_init=args.networks * args.init_factor,
            chunk=args.chunk,
            seed=args.seed + w,
            theta=theory.ntk,
        )
        means.append(r1.mean(0) + r2.mean(0))
        print(
            f"width {w}: n*SE trained stage {w * r1.std(0, ddof=1) / math.sqrt(len(r1))}, "
            f"untrained stage {w * r2.std(0, ddof=1) / math.sqrt(len(r2))}",
            flush=True,
        )
        ses.append(np.sqrt(r1.var(0, ddof=1) / r1.shape[0] + r2.var(0, ddof=1) / r2.shape[0]))
        kmeans.append(dk.mean(0))
        kses.append(dk.std(0, ddof=1) / math.sqrt(dk.shape[0]))
    t_mc = time.time() - t1
    for w, m, s_ in zip(widths, means, ses, strict=True):
        print(f"width {w}: departure E[f_T] - mean = {m} +- {s_}; n * departure = {w * m}")
    if len(widths) >= 2:
        # the measured power law |departure| ~ n^-p between the widths (per test output)
        lw = np.log(np.asarray(widths, float))
        for j in range(args.n_test):
            dep = np.abs([m[j] for m in means])
            p = -np.polyfit(lw, np.log(dep), 1, w=dep / np.asarray([s_[j] for s_ in ses]))[0]
            print(f"test output {j}: |departure| ~ n^-{p:.2f} (log-log fit)")
    rows = []
    for j in range(args.n_test):
        c, se, d, chi = fit(widths, [m[j] for m in means], [s[j] for s in ses])
        rows.append(
            dict(
                kind="test_output",
                index=j,
                predicted=float(pred[j]),
                fitted=c,
                se=se,
                slope=d,
                chi2_dof=chi,
                z=(c - pred[j]) / se,
            )
        )
    n_all = args.n_train + args.n_test
    for a in range(n_all):
        for b in range(a, n_all):
            c, se, d, chi = fit(widths, [m[a, b] for m in kmeans], [s[a, b] for s in kses])
            rows.append(
                dict(
                    kind="ntk_change",
                    index=[a, b],
                    predicted=float(pred_k[a, b]),
                    fitted=c,
                    se=se,
                    slope=d,
                    chi2_dof=chi,
                    z=(c - pred_k[a, b]) / se,
                )
            )
    for r in rows:
        print(
            f"{r['kind']:12s} {str(r['index']):8s} predicted {r['predicted']:+.5f}  "
            f"fitted {r['fitted']:+.5f} +- {r['se']:.5f}  z {r['z']:+.2f}  "
            f"chi2/dof {r['chi2_dof']:.2f}"
        )
    zs = np.array([r["z"] for r in rows])
    print(
        f"{args.activation} depth {args.depth} {residual or 'plain'} n_0 {args.in_dim} "
        f"widths {widths} networks/width {args.networks} "
        f"steps {args.steps} eta {eta:.4g} (stability {theory.stability:.3f}): "
        f"max |z| {np.max(np.abs(zs)):.2f} over {len(zs)}; theory {t_theory:.1f} s, "
        f"MC {t_mc:.1f} s"
    )
    parts = {
        k: (np.asarray(getattr(theory, "correction_" + k))[:, 0] * n0).tolist()
        for k in ("ntk_mean", "ntk_fluctuation", "dntk", "ddntk1", "ddntk2")
    }
    print("predicted parts (n * part):", json.dumps(parts))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                dict(
                    args=vars(args),
                    eta=eta,
                    rows=rows,
                    parts=parts,
                    theory_s=t_theory,
                    mc_s=t_mc,
                    mean=np.asarray(theory.mean[:, 0]).tolist(),
                ),
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
