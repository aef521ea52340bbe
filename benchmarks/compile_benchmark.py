"""First-call (tracing + XLA compilation) and second-call times of rgnn's public entry points.

Each case runs in a fresh Python process, so nothing is compiled or cached when it starts (JAX's
persistent compilation cache is switched off in that process). The process times ``import jax``
and ``import rgnn``, sets up the case's inputs (the README's "Using it" shapes, float64), then
times the case's call twice with the same shapes, blocking on every array of the result:

* first call: tracing, lowering, XLA compilation, one-time imports (neural-tangents) and the run;
* second call: the run alone, if nothing retraces (its compilation count says whether it did);
* compile share = (first - second) / first: the part of the first call that is one-time cost;
* compilations: the number of XLA compilations during the call (jax.monitoring's
  backend-compile events; eager operations outside a jit count one each), and ``staging_s``,
  the wall time inside JAX's tracing, lowering and compiling (union of their time spans).

``--tree PATH`` measures the rgnn package of another checkout (for example an older commit in a
``git worktree``): the case processes import rgnn from PATH (prepended to PYTHONPATH), and the
JSON records that checkout's commit, never its path. The JSON is rewritten after every case, so
an interrupted run keeps its finished cases; a case over ``--timeout`` is killed and recorded as
``timeout`` with whatever stages it finished.

    python benchmarks/compile_benchmark.py [--cases a,b] [--timeout 300] [--tree PATH]
                                           [--out benchmarks/results/compile_benchmark.json]
    python benchmarks/compile_benchmark.py --list
"""

import argparse
import dataclasses
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_MARK = "@@compile_benchmark "  # prefix of the case process's result lines on stdout


class Unsupported(Exception):
    """The measured rgnn does not offer what the case calls (recorded, not an error)."""


# ----------------------------------------------------------------------------- the cases
# Each case is ``setup(rgnn, jax) -> call``: setup builds the inputs (timed as setup_s, not as
# the call), ``call()`` is what is timed twice. README shapes: digits(64), so N = 64 inputs of
# dimension 64, and the README's depth-5, width-512 GELU MLP.


def _digits(rgnn, n=64):
    x, _ = rgnn.data.digits(n)
    return x


def _readme_arch(rgnn):
    return rgnn.MLP(
        depth=5,
        width=512,
        activation="gelu",
        weight_var=1.8,
        bias_var=0.05,
        parameterization="ntk",
    )


def _issue_arch(rgnn, depth):
    """The architecture of issue 13's headline case (depth 3) and of the depth pair."""
    return rgnn.MLP(depth, 64, "gelu", weight_var=1.5, bias_var=0.1)


def _fixed_point(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.fixed_point(arch, x)


def _fixed_point_nt(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.fixed_point(arch, x, backend="neural_tangents")


def _ensemble_kernels(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)

    def call():
        ens = rgnn.ensemble(arch, x.shape[1], n_networks=64, key=jax.random.key(0))
        return rgnn.empirical_nngp(ens, x), rgnn.empirical_ntk(ens, x)

    return call


def _perturbative(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.perturbative(arch, x)


def _perturbative_dntk(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.perturbative(arch, x[:8], dntk=True)


def _perturbative_ddntk(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.perturbative(arch, x[:8], ddntk=True)


def _vertex(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.vertex(arch, x[:4])


def _measure(rgnn, jax):
    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: rgnn.measure(arch, x, n_networks=128, key=jax.random.key(1))


def _critical_point(rgnn, jax):
    return lambda: str(rgnn.critical_point("gelu"))  # the README prints it


def _criticality(rgnn, jax):
    return lambda: rgnn.criticality("tanh", 1.5, 0.0).phase


def _train(rgnn, jax):
    arch = _readme_arch(rgnn)
    xs, ys = rgnn.data.teacher_student(64, 16)
    return lambda: rgnn.train(
        arch, xs, ys, steps=100, learning_rate=0.5, n_networks=8, key=jax.random.key(2)
    )


def _compare(rgnn, jax):
    # setup trains (and so compiles the training step) as the README does before compare
    arch = _readme_arch(rgnn)
    xs, ys = rgnn.data.teacher_student(64, 16)
    run = rgnn.train(
        arch, xs, ys, steps=100, learning_rate=0.5, n_networks=8, key=jax.random.key(2)
    )
    _block(jax, run)
    return lambda: rgnn.compare(arch, xs, run)


def _stax(rgnn, jax):
    arch = _readme_arch(rgnn)
    return lambda: arch.stax()


def _network(rgnn, jax):
    from flax import nnx

    arch, x = _readme_arch(rgnn), _digits(rgnn)
    return lambda: nnx.state(arch.network(x.shape[1], rngs=nnx.Rngs(0)))


def _import_nt(rgnn, jax):
    return lambda: rgnn.import_neural_tangents()


def _headline_ddntk(rgnn, jax):
    arch, x = _issue_arch(rgnn, 3), _digits(rgnn)
    return lambda: rgnn.perturbative(arch, x[:3], ddntk=True)


def _dntk_depth(depth):
    def setup(rgnn, jax):
        arch, x = _issue_arch(rgnn, depth), _digits(rgnn)
        return lambda: rgnn.perturbative(arch, x[:3], dntk=True)

    return setup


def _full(n):
    def setup(rgnn, jax):
        if "full" not in inspect.signature(rgnn.perturbative).parameters:
            raise Unsupported("rgnn.perturbative has no full= argument")
        arch, x = _issue_arch(rgnn, 3), _digits(rgnn)
        return lambda: rgnn.perturbative(arch, x[:n], full=True)

    return setup


# name -> (setup, what it calls)
CASES = {
    "fixed_point": (_fixed_point, "fixed_point(arch, x)"),
    "fixed_point_nt": (_fixed_point_nt, 'fixed_point(arch, x, backend="neural_tangents")'),
    "ensemble_kernels": (
        _ensemble_kernels,
        "ensemble(arch, 64, n_networks=64) + empirical_nngp + empirical_ntk",
    ),
    "perturbative": (_perturbative, "perturbative(arch, x)"),
    "perturbative_dntk": (_perturbative_dntk, "perturbative(arch, x[:8], dntk=True)"),
    "perturbative_ddntk": (_perturbative_ddntk, "perturbative(arch, x[:8], ddntk=True)"),
    "vertex": (_vertex, "vertex(arch, x[:4])"),
    "measure": (_measure, "measure(arch, x, n_networks=128)"),
    "critical_point": (_critical_point, 'print(critical_point("gelu"))'),
    "criticality": (_criticality, 'criticality("tanh", 1.5, 0.0).phase'),
    "train": (_train, "train(arch, xs[64, 16], ys, steps=100, n_networks=8)"),
    "compare": (_compare, "compare(arch, xs, run) (setup: the train case)"),
    "stax": (_stax, "arch.stax()"),
    "network": (_network, "arch.network(64, rngs=nnx.Rngs(0))"),
    "import_neural_tangents": (_import_nt, "import_neural_tangents()"),
    "headline_ddntk": (
        _headline_ddntk,
        'perturbative(MLP(3, 64, "gelu", 1.5, 0.1), x[:3], ddntk=True)',
    ),
    "dntk_depth2": (_dntk_depth(2), 'perturbative(MLP(2, 64, "gelu", 1.5, 0.1), x[:3], dntk=True)'),
    "dntk_depth10": (
        _dntk_depth(10),
        'perturbative(MLP(10, 64, "gelu", 1.5, 0.1), x[:3], dntk=True)',
    ),
    "full_n4": (_full(4), 'perturbative(MLP(3, 64, "gelu", 1.5, 0.1), x[:4], full=True)'),
    "full_n16": (_full(16), 'perturbative(MLP(3, 64, "gelu", 1.5, 0.1), x[:16], full=True)'),
}


# ----------------------------------------------------------------------------- case process
def _block(jax, out):
    """Wait for every array in ``out`` (pytrees, and dataclasses that are not pytrees)."""
    pending, seen = [out], set()
    while pending:
        obj = pending.pop()
        for leaf in jax.tree_util.tree_leaves(obj):
            if isinstance(leaf, jax.Array):
                leaf.block_until_ready()
            elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
                if id(leaf) not in seen:
                    seen.add(id(leaf))
                    pending.extend(getattr(leaf, f.name) for f in dataclasses.fields(leaf))


class _Staging:
    """Counts XLA compilations and the time spent tracing, lowering and compiling."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def __init__(self, monitoring):
        self.spans = []
        monitoring.register_event_time_span_listener(self._on_span)

    def _on_span(self, event, start, end, **kwargs):
        kind = self.EVENTS.get(event)
        if kind is not None:
            self.spans.append((kind, start, end, str(kwargs.get("fun_name", "?"))))

    def take(self):
        """The statistics of the spans since the last call, then forget them."""
        spans, self.spans = self.spans, []
        compiles = [(end - start, name) for kind, start, end, name in spans if kind == "compile"]
        union, last_end = 0.0, float("-inf")  # nested traces overlap: measure the union
        for _, start, end, _ in sorted(spans, key=lambda s: s[1]):
            if end > last_end:
                union += end - max(start, last_end)
                last_end = end
        return dict(
            n_compilations=len(compiles),
            n_traces=sum(kind == "trace" for kind, *_ in spans),
            backend_compile_s=sum(d for d, _ in compiles),
            staging_s=union,
            slowest_compilations=[[n, round(d, 3)] for d, n in sorted(compiles)[::-1][:5]],
        )


def _emit(**fields):
    print(_MARK + json.dumps(fields), flush=True)


def _case_process(name, tree):
    """Runs one case in this (fresh) process and prints its stages as marked JSON lines."""
    start = time.perf_counter()
    import jax

    jax_done = time.perf_counter()
    import rgnn

    done = time.perf_counter()
    location = Path(rgnn.__file__).resolve()
    if not location.is_relative_to(tree):
        sys.exit(f"rgnn was imported from outside the measured tree ({location}); check the venv")
    _emit(import_jax_s=jax_done - start, import_rgnn_s=done - jax_done, import_s=done - start)

    import jaxlib
    from jax import monitoring

    jax.config.update("jax_enable_x64", True)  # as the README does
    jax.config.update("jax_enable_compilation_cache", False)  # nothing from earlier runs
    staging = _Staging(monitoring)
    device = jax.devices()[0]  # initialize the backend outside the timed calls
    _emit(
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        backend=jax.default_backend(),
        device=str(device),
        device_kind=getattr(device, "device_kind", ""),
    )
    setup, _ = CASES[name]
    warnings.simplefilter("ignore", UserWarning)  # rgnn's accuracy warnings: not timed here
    staging.take()
    t0 = time.perf_counter()
    try:
        call = setup(rgnn, jax)
    except Unsupported as exc:
        _emit(status="unsupported", reason=str(exc))
        return
    _emit(setup_s=time.perf_counter() - t0, setup=staging.take())
    for which in ("first", "second"):
        t0 = time.perf_counter()
        _block(jax, call())
        _emit(**{f"{which}_call_s": time.perf_counter() - t0, which: staging.take()})
    _emit(status="ok")


# ----------------------------------------------------------------------------- driver
def _git(tree, *args):
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _run_case(name, tree, timeout):
    """One case in a fresh process; returns its record (status ok/timeout/error/unsupported)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case-process", name]
    cmd += ["--tree", str(tree)]
    record = dict(case=name, calls=CASES[name][1], load_average_before=os.getloadavg()[0])
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a timeout kills the case's whole process group
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = "timeout"
    record["process_s"] = time.perf_counter() - start
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            record.update(json.loads(line[len(_MARK) :]))
    if status == "timeout":
        record["status"] = "timeout"
        record["timeout_s"] = timeout
    elif proc.returncode != 0 or "status" not in record:
        record["status"] = "error"
        record["returncode"] = proc.returncode
        error = "\n".join(stderr.strip().splitlines()[-15:])
        for path, name in ((sys.prefix, "<venv>"), (str(tree), "<tree>"), (str(REPO), "<repo>")):
            error = error.replace(path, name)  # no machine paths in the results
        record["error"] = error
    first, second = record.get("first_call_s"), record.get("second_call_s")
    if first is not None and second is not None and first > 0:
        record["compile_share"] = (first - second) / first
    return record


def _fmt(value, spec):
    if isinstance(value, int | float):
        return format(value, spec)
    return "-".rjust(int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))


def _row(r):
    first, second = r.get("first", {}), r.get("second", {})
    return (
        f"{r['case']:24s} {r.get('status', '?'):11s} {_fmt(r.get('import_s'), '7.2f')} "
        f"{_fmt(r.get('setup_s'), '7.2f')} {_fmt(r.get('first_call_s'), '9.2f')} "
        f"{_fmt(r.get('second_call_s'), '9.3f')} {_fmt(r.get('compile_share'), '7.1%')} "
        f"{_fmt(first.get('n_compilations'), '6d')} {_fmt(second.get('n_compilations'), '6d')} "
        f"{_fmt(first.get('staging_s'), '9.2f')}"
    )


HEADER = (
    f"{'case':24s} {'status':11s} {'import':>7s} {'setup':>7s} {'1st call':>9s} "
    f"{'2nd call':>9s} {'compile':>7s} {'#comp1':>6s} {'#comp2':>6s} {'staging1':>9s}\n"
    f"{'':24s} {'':11s} {'s':>7s} {'s':>7s} {'s':>9s} {'s':>9s} {'share':>7s} "
    f"{'':>6s} {'':>6s} {'s':>9s}"
)


def _write(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="cases: " + ", ".join(CASES),
    )
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "compile_benchmark.json",
        help="JSON file to write (rewritten after every case)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="checkout whose rgnn package is measured (default: this one)",
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--case-process", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args()

    tree = args.tree.resolve()
    if not (tree / "rgnn" / "__init__.py").is_file():
        parser.error(f"--tree: no rgnn package in {args.tree} (expected {tree}/rgnn/__init__.py)")
    if args.case_process is not None:
        if args.case_process not in CASES:
            parser.error(f"unknown case {args.case_process!r}")
        _case_process(args.case_process, tree)
        return
    if args.list:
        for name, (_, calls) in CASES.items():
            print(f"{name:24s} {calls}")
        return
    names = list(CASES) if args.cases is None else [c for c in args.cases.split(",") if c]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"--cases: unknown {unknown or 'none given'}; known: {', '.join(CASES)}")
    if args.timeout <= 0:
        parser.error("--timeout: expected a positive number of seconds")

    commit = _git(tree, "rev-parse", "HEAD")
    dirty = _git(tree, "status", "--porcelain", "--untracked-files=no")
    results = dict(
        script="benchmarks/compile_benchmark.py",
        tree="this checkout" if tree == REPO else "another checkout (--tree)",
        commit=commit,
        tree_modified=None if dirty is None else bool(dirty),
        benchmark_commit=_git(REPO, "rev-parse", "HEAD"),
        timeout_s=args.timeout,
        cpu_count=os.cpu_count(),
        cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        machine=platform.machine(),
        platform=platform.platform(),
        python=platform.python_version(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        cases=[],
    )
    print(f"rgnn at commit {commit}{' (modified)' if dirty else ''}; one fresh process per case")
    print(HEADER, flush=True)
    for name in names:
        record = _run_case(name, tree, args.timeout)
        for key in ("jax_version", "jaxlib_version", "backend", "device", "device_kind"):
            if key in record:
                results.setdefault(key, record.pop(key))
        results["cases"].append(record)
        _write(args.out, results)
        print(_row(record), flush=True)
        if record["status"] == "error":
            print("    " + record["error"].replace("\n", "\n    "), flush=True)
        elif record["status"] == "unsupported":
            print(f"    {record['reason']}", flush=True)
    bad = [r["case"] for r in results["cases"] if r["status"] in ("error", "timeout")]
    print(f"wrote {args.out}" + (f"; not finished: {', '.join(bad)}" if bad else ""))


if __name__ == "__main__":
    main()
