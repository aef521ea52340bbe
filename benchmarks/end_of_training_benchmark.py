"""The O(1/n) end-of-training prediction vs Monte Carlo over trained networks, time to solution.

``rgnn.end_of_training`` on ``--n-train`` (default 32) training inputs and ``--n-test`` test
inputs for a depth-3 tanh MLP trained ``--steps`` steps of full-batch gradient descent (the
learning rate at ``e lambda_max = --stability``), against the Monte Carlo ensemble that
determines the same quantity, the mean test output of trained networks of width ``--width``,
to a standard error of ``--target`` (default 10%) of the predicted O(1/n) shift (the largest
over the test outputs). Monte Carlo uses ``rgnn.train`` with each network's infinite-width
linearized trajectory (kernel gradient descent with the fixed-point NTK from its own initial
outputs, whose mean is the prediction's ``mean`` exactly) as a control variate; the ensemble
size needed follows from the residual's standard deviation on a pilot ensemble, and the Monte
Carlo time is the pilot's per-network time times that size. The pilot's own mean is compared
with ``mean + correction`` (in its standard errors). Ratio = Monte Carlo time / prediction
time (> 1: the prediction is cheaper). Uses only the public API; writes
benchmarks/results/end_of_training.json.

    python benchmarks/end_of_training_benchmark.py [--n-train 32] [--width 128] [--steps 200]
        [--quadrature-order-multi 16]
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rgnn


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _problem(n_train, n_test, in_dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, in_dim))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(in_dim)
    y = np.sin(x[:n_train, :1]) + 0.5 * x[:n_train, 1:2]
    return jnp.asarray(x[:n_train]), jnp.asarray(y), jnp.asarray(x[n_train:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=2)
    ap.add_argument("--in-dim", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--stability", type=float, default=1.0)
    ap.add_argument("--target", type=float, default=0.1)
    ap.add_argument("--pilot", type=int, default=256)
    ap.add_argument(
        "--quadrature-order-multi",
        type=int,
        default=None,
        help="nodes per dimension of the three/four-input rule (default: the node budget's)",
    )
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "end_of_training.json")
    )
    args = ap.parse_args(argv)
    for name in ("n_train", "n_test", "in_dim", "depth", "width", "steps", "pilot"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')}: expected an integer >= 1", file=sys.stderr)
            return 2
    if args.quadrature_order_multi is not None and args.quadrature_order_multi < 3:
        print("--quadrature-order-multi: expected an integer >= 3", file=sys.stderr)
        return 2
    if not 0 < args.stability < 2 or args.target <= 0:
        print("--stability: expected in (0, 2); --target: expected > 0", file=sys.stderr)
        return 2
    jax.config.update("jax_enable_x64", True)
    load_start = os.getloadavg()
    x_tr, y, x_te = _problem(args.n_train, args.n_test, args.in_dim, 0)
    arch = rgnn.MLP(args.depth, args.width, activation=args.activation, bias_var=0.1)
    x_all = jnp.concatenate([x_tr, x_te])
    theta = rgnn.fixed_point(arch, x_all).ntk[-1]
    lam, v = np.linalg.eigh(np.asarray(theta[: args.n_train, : args.n_train]))
    eta = args.stability * args.n_train / lam[-1]

    def predict():
        return rgnn.end_of_training(
            arch,
            x_tr,
            y,
            x_te,
            learning_rate=eta,
            steps=args.steps,
            quadrature_order_multi=args.quadrature_order_multi,
        )

    pred, t_first = _timed(predict)
    pred, t_pred = _timed(predict)
    corr = np.asarray(pred.correction[:, 0])
    target_se = args.target * float(np.max(np.abs(corr)))

    # Monte Carlo pilot: residuals against each network's linearized trajectory
    e = eta / args.n_train
    reg = np.asarray(theta[args.n_train :, : args.n_train]) @ v
    lin = jnp.asarray(reg @ np.diag((1 - (1 - e * lam) ** args.steps) / lam) @ v.T)

    def pilot(key):
        run = rgnn.train(
            arch,
            x_tr,
            y,
            steps=args.steps,
            learning_rate=eta,
            n_networks=args.pilot,
            key=key,
            record_steps=[args.steps],
            x_test=x_te,
            record_kernels=False,
        )
        z0_tr, z0_te = run.outputs[0][..., 0], run.test_outputs[0][..., 0]
        zlin = z0_te + (y[:, 0][None] - z0_tr) @ lin.T
        return run.test_outputs[-1][..., 0] - zlin

    rgnn.train(
        arch,
        x_tr,
        y,
        steps=args.steps,
        learning_rate=eta,
        n_networks=args.pilot,
        key=jax.random.key(0),
        record_steps=[args.steps],
        x_test=x_te,
        record_kernels=False,
    )  # compile
    res, t_pilot = _timed(lambda: pilot(jax.random.key(1)))
    res = np.asarray(res)
    sd = res.std(0, ddof=1)
    needed = int(np.ceil(np.max((sd / target_se) ** 2)))
    t_mc = t_pilot / args.pilot * needed
    measured = res.mean(0)
    se = sd / math.sqrt(args.pilot)
    z = (measured - corr) / se
    result = dict(
        settings=vars(args),
        learning_rate=float(eta),
        platform=platform.platform(),
        device=str(jax.devices()[0]),
        cpus=os.cpu_count(),
        load_average_start=list(load_start),
        load_average_end=list(os.getloadavg()),
        quadrature_error=float(pred.quadrature_error),
        prediction_first_call_s=t_first,
        prediction_s=t_pred,
        mean=np.asarray(pred.mean[:, 0]).tolist(),
        correction=corr.tolist(),
        target_se=target_se,
        pilot_networks=args.pilot,
        pilot_s=t_pilot,
        residual_sd=sd.tolist(),
        networks_needed=needed,
        monte_carlo_s=t_mc,
        ratio=t_mc / t_pred,
        ratio_first_call=t_mc / t_first,
        pilot_departure=measured.tolist(),
        pilot_departure_se=se.tolist(),
        pilot_z=z.tolist(),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"end_of_training ({args.n_train} train + {args.n_test} test inputs, depth {args.depth}, "
        f"{args.activation}, {args.steps} steps): {t_pred:.2f} s ({t_first:.1f} s first call); "
        f"Monte Carlo to SE {target_se:.2e} ({args.target:.0%} of the O(1/n) shift) at width "
        f"{args.width}: {needed} networks, {t_mc:.1f} s; ratio {t_mc / t_pred:.1f} "
        f"({t_mc / t_first:.1f} against the first call)"
    )
    print(f"pilot ({args.pilot} networks): departure {measured} +- {se}, predicted {corr} (z {z})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
