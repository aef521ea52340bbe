"""Width sweeps: train ensembles across widths and seeds, measure, fit scaling exponents.

The study of how far trained networks sit from the Gaussian fixed point: the sweep grid, the
runner (:func:`sweep`, re-exported as :func:`rgnn.sweep`), the resumable results store and the
scaling fits. The module is named ``study``, not ``sweep``, so that the public function
``rgnn.sweep`` does not shadow it; ``rgnn.sweep.MEASURES`` is :data:`MEASURES` all the same (a
function attribute).

A sweep is the grid ``depths x activations x parameterizations x learning_rates x widths x
seeds`` around one base :class:`~rgnn.MLP`. Each *point* trains an ensemble of ``n_networks``
networks (:func:`rgnn.train`), compares it with the Gaussian fixed point
(:func:`rgnn.compare`) and adds the perturbative predictions (:func:`rgnn.perturbative`),
reduced to one number per *measure* (:data:`MEASURES`) with its standard error. A *group* is
one setting of everything but width and seed; within a group each measure is fitted against
width.

**Scaling fit.** Seeds are pooled at each width (mean, and the standard error of the mean over
seeds, never below the one propagated from the points' own standard errors). The exponent
``p`` of ``v(n) = c n^p`` is the weighted least-squares slope of ``log v`` against ``log n``
with weights ``1 / sigma_log^2``, ``sigma_log = se / v`` (the delta method). Its standard error
is from the weighted normal equations, ``(X^T W X)^{-1}``, inflated by ``sqrt(chi^2 / dof)``
when the points scatter more than their errors say (the Birge ratio, the Particle Data Group's
scale factor; never deflated), so it reflects both the standard errors and the residuals; the
confidence interval is ``p +- 1.96 se`` (normal quantile; the scale factor makes it slightly
conservative). Without standard errors the fit is unweighted, its error comes from the
residuals alone and the interval uses Student's ``t`` with ``K - 2`` degrees of freedom
(``K`` widths). The
infinite-width value is the intercept ``v_inf`` of the weighted linear fit
``v(n) = v_inf + b n^e`` with ``e`` the measure's *expected* exponent (``-1`` for O(1/n)
effects, ``-1/2`` for single-network fluctuations, PDLT ch. 4 and 8), with its standard error
from the same normal equations.

**Results store.** ``out/sweep.json`` holds the sweep's configuration and the hash of its
*identity*: everything but the grid axes (the base architecture's variances and output
dimension, the data, the training settings); ``out/points.jsonl`` one JSON record per finished
point, each keyed by the SHA-256 of its full configuration (its point on the grid, the base, the
data, the settings). The file is rewritten as a whole into a temporary file in the same
directory, flushed to disk and moved over the old one with ``os.replace`` (atomic on POSIX),
once per finished point: an interrupted run (Ctrl-C, ``kill -9``) loses at most the point in
flight, and running the same sweep again skips every point already in the file. A sweep with
the same identity and other grid axes (more widths, more seeds, another depth) *extends* the
folder: finished points are reused, ``sweep.json`` then lists the union of the axes, and the
returned :class:`Sweep`, the table and the plots cover every finished point of that union. A
folder holding a sweep of another identity is refused, naming the settings that differ.
Nothing is written before the arguments are checked and the first point has finished:
``sweep.json`` and ``points.jsonl`` appear with the first finished point, so a typo that makes
every point fail leaves no trace. ``table.csv``, ``table.json`` and the PNG plots are written
when the sweep finishes. Every JSON file is strict JSON (``NaN`` and infinities are written as
``null``; :func:`strict_json`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from rgnn.architecture import MLP, PARAMETERIZATIONS

__all__ = [
    "MEASURES",
    "Measure",
    "ScalingFit",
    "Sweep",
    "fit_scaling",
    "load_sweep",
    "run_point",
    "strict_json",
    "sweep",
]

GROUP_FIELDS = ("depth", "activation", "parameterization", "learning_rate")
"""The sweep axes besides width and seed; one setting of them is a group."""

STORE_VERSION = 2
"""2: the key hashes the sweep's identity (:func:`_identity`), not its grid."""
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Measure:
    """A number each point reports.

    Perturbation theory makes every deviation from the fixed point a sum of an O(1/n) mean
    shift and, for a quantity of a single network, an O(1/sqrt(n)) fluctuation around it
    (PDLT ch. 4 and 8: the metric and NTK have variances ``~ 1/n`` and mean shifts ``~ 1/n``).
    A per-network measure therefore falls with an exponent between ``-1`` (mean shift
    dominates, small widths) and ``-1/2`` (fluctuation dominates, large widths); an
    ensemble-mean measure falls as ``n^{-1}``.

    Attributes:
      name: the key in a point's ``measures``.
      expected_exponent: the slowest perturbative rate (``-1/2`` for a per-network measure,
        ``-1`` for a mean): the asymptotic exponent, used to extrapolate to infinite width.
      description: one line, with the formula.
      threshold: below this the fixed point describes the network "within tolerance"
        (:func:`rgnn.classify`); relative quantities, so dimensionless.
      predicted: whether points carry a perturbative prediction of the measure.
      fastest_exponent: the fastest perturbative rate (``-1``).
    """

    name: str
    expected_exponent: float
    description: str
    threshold: float = 0.05
    predicted: bool = False
    fastest_exponent: float = -1.0


MEASURES: dict[str, Measure] = {}
"""The measures a sweep point reports, by name (filled in below)."""


def _register(*measures: Measure) -> None:
    for m in measures:
        MEASURES[m.name] = m


# ----------------------------------------------------------------------------- scaling fits
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """The fit of one measure against width within one group.

    Attributes:
      widths: ``[K]`` the widths fitted.
      values: ``[K]`` the measure at each width (mean over seeds).
      ses: ``[K]`` its standard errors.
      exponent: the fitted ``p`` of ``v = prefactor * n^p``.
      exponent_se: its standard error.
      exponent_low, exponent_high: the :data:`CONFIDENCE` interval of ``p``.
      prefactor: ``c`` of ``v = c n^p``.
      infinite_width: ``v_inf`` of ``v = v_inf + b n^expected``, the extrapolation to
        infinite width.
      infinite_width_se: its standard error.
      chi2_dof: reduced chi-square of the log-log fit (``nan`` with two widths).
      expected: the expected exponent used for the extrapolation (static).
      measure: the measure's name (static).
      group: the group, as ``((field, value), ...)`` (static).
    """

    widths: np.ndarray
    values: np.ndarray
    ses: np.ndarray
    exponent: float
    exponent_se: float
    exponent_low: float
    exponent_high: float
    prefactor: float
    infinite_width: float
    infinite_width_se: float
    chi2_dof: float
    expected: float = dataclasses.field(default=-1.0, metadata=dict(static=True))
    measure: str = dataclasses.field(default="", metadata=dict(static=True))
    group: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    def as_dict(self) -> dict:
        """JSON-ready."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("widths", "values", "ses"):
            d[k] = [float(v) for v in d[k]]
        d["group"] = dict(self.group)
        return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in d.items()}


def _weighted_line(t, v, w):
    """Weighted least squares ``v = a + b t``: ``(a, b, cov, chi2, dof)``; ``cov`` is the
    inverse of the weighted normal matrix, not yet scaled by the residuals."""
    x = np.stack([np.ones_like(t), t], axis=1)
    normal = x.T @ (w[:, None] * x)
    cov = np.linalg.inv(normal)
    coef = cov @ (x.T @ (w * v))
    r = v - x @ coef
    return coef[0], coef[1], cov, float(np.sum(w * r * r)), len(t) - 2


def _quantile(dof: int) -> float:
    """The two-sided :data:`CONFIDENCE` quantile: Student's ``t`` with ``dof`` degrees of
    freedom, the normal one for ``dof = 0`` (known standard errors)."""
    from scipy import stats

    q = 0.5 + CONFIDENCE / 2
    return float(stats.t.ppf(q, dof)) if dof >= 1 else float(stats.norm.ppf(q))


def fit_scaling(widths, values, ses=None, *, expected: float = -1.0, measure="", group=()):
    """Fit ``v = c n^p`` (weighted log-log least squares) and ``v = v_inf + b n^expected``.

    Args:
      widths: ``[K]`` widths (``K >= 2`` distinct, positive).
      values: ``[K]`` the measure (only positive values enter the log-log fit).
      ses: ``[K]`` standard errors; ``None`` (or any non-positive) fits unweighted, and the
        standard errors then come from the residuals alone.
      expected: the exponent used for the infinite-width extrapolation (``< 0``).

    Returns:
      A :class:`ScalingFit` (see the module docstring for the statistics). Quantities that
      cannot be estimated (fewer than two positive values) are ``nan``.
    """
    n = np.asarray(widths, float)
    v = np.asarray(values, float)
    if n.ndim != 1 or v.shape != n.shape or len(n) < 2:
        raise ValueError(
            f"widths: expected matching 1-D arrays of at least 2 widths and values, got "
            f"{n.shape} and {v.shape}"
        )
    if np.any(n <= 0) or len(np.unique(n)) < 2:
        raise ValueError(f"widths: expected at least 2 distinct positive widths, got {n}")
    if not expected < 0:
        raise ValueError(f"expected: expected a negative exponent, got {expected!r}")
    s = np.full_like(v, np.nan) if ses is None else np.asarray(ses, float)
    weighted = bool(np.all(np.isfinite(s)) and np.all(s > 0))
    nan = float("nan")
    keep = np.isfinite(v) & (v > 0)
    p = p_se = lo = hi = c = chi2_dof = nan
    if np.unique(n[keep]).size >= 2:
        t, y = np.log(n[keep]), np.log(v[keep])
        w = (v[keep] / s[keep]) ** 2 if weighted else np.ones_like(t)
        a, b, cov, chi2, dof = _weighted_line(t, y, w)
        chi2_dof = chi2 / dof if dof > 0 else nan
        if weighted:
            scale = max(1.0, chi2_dof) if dof > 0 else 1.0
        else:
            scale = chi2_dof
        p, c = float(b), float(np.exp(a))
        p_se = float(np.sqrt(cov[1, 1] * scale))
        q = _quantile(dof if not weighted else 0)
        lo, hi = p - q * p_se, p + q * p_se
    fin = np.isfinite(v)
    v_inf = v_inf_se = nan
    if np.unique(n[fin]).size >= 2:
        w = 1 / s[fin] ** 2 if weighted else np.ones(int(fin.sum()))
        a, _, cov, chi2, dof = _weighted_line(n[fin] ** expected, v[fin], w)
        if weighted:
            scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
        else:
            scale = chi2 / dof if dof > 0 else nan
        v_inf, v_inf_se = float(a), float(np.sqrt(cov[0, 0] * scale))
    return ScalingFit(
        widths=n,
        values=v,
        ses=s,
        exponent=p,
        exponent_se=p_se,
        exponent_low=lo,
        exponent_high=hi,
        prefactor=c,
        infinite_width=v_inf,
        infinite_width_se=v_inf_se,
        chi2_dof=chi2_dof,
        expected=float(expected),
        measure=measure,
        group=tuple(group),
    )


def pool_seeds(values, ses=None) -> tuple[float, float]:
    """Mean over seeds and its standard error: the spread over seeds (``std / sqrt(k)``),
    never below ``sqrt(sum se_i^2) / k`` propagated from the points' own errors; with one seed,
    that point's error."""
    v = np.asarray(values, float)
    s = np.zeros_like(v) if ses is None else np.nan_to_num(np.asarray(ses, float), nan=0.0)
    k = len(v)
    mean = float(np.mean(v))
    propagated = float(np.sqrt(np.sum(s**2)) / k)
    if k == 1:
        return mean, propagated if propagated > 0 else float("nan")
    return mean, max(float(np.std(v, ddof=1) / np.sqrt(k)), propagated)


# ----------------------------------------------------------------------------- the store
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _hash(obj) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:20]


def _data_hash(x, y) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _strict(obj):
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """``json.dumps`` of ``obj`` as strict JSON: ``NaN`` and infinities become ``null``, NumPy
    scalars and arrays plain numbers and lists (``allow_nan=False`` then guarantees it)."""
    return json.dumps(_strict(obj), allow_nan=False, **kwargs)


AXES = ("widths", "seeds", "depths", "activations", "parameterizations", "learning_rates")
"""The grid axes of a sweep's configuration: a folder can be extended along them."""


def _identity(config: dict) -> dict:
    """What a sweep folder is about: its configuration without the grid axes."""
    return {k: v for k, v in config.items() if k not in AXES}


def _differences(old, new, prefix="") -> list[str]:
    """``"key: old -> new"`` for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif _canonical(a) != _canonical(b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _union(old: list, new: list) -> list:
    merged = list(old) + [v for v in new if v not in old]
    return sorted(merged) if all(isinstance(v, int | float) for v in merged) else merged


class _Store:
    """``out/sweep.json`` (configuration) and ``out/points.jsonl`` (finished points).

    Opening reads and checks; nothing is written until the first :meth:`add`."""

    def __init__(self, out, config: dict):
        self.dir = Path(out)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"out: expected a directory, got the file {str(self.dir)!r}")
        self.key = _hash(_identity(config))
        self.config = config
        self.meta = self.dir / "sweep.json"
        self.points = self.dir / "points.jsonl"
        self.records: dict[str, dict] = {}
        self.written = False
        if self.meta.exists():
            try:
                old = json.loads(self.meta.read_text())
                old_config = old["config"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"out: {str(self.meta)!r} is not a sweep configuration") from None
            diff = _differences(_identity(old_config), _identity(config))
            if diff:
                raise ValueError(
                    f"out: {str(self.dir)!r} holds a different sweep ({'; '.join(diff)}); "
                    "choose another --out or remove it"
                )
            # the same sweep: its folder keeps the union of both grids
            self.config = dict(config)
            for axis in AXES:
                self.config[axis] = _union(old_config.get(axis, []), config[axis])
        if self.points.exists():
            for i, line in enumerate(self.points.read_text().splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        self.records[rec["key"]] = rec
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"out: line {i + 1} of {str(self.points)!r} is not a sweep point"
                        ) from None

    def _write_meta(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        doc = dict(rgnn_sweep=STORE_VERSION, key=self.key, config=self.config)
        _atomic_write(self.meta, strict_json(doc, indent=2) + "\n")
        self.written = True

    def add(self, record: dict) -> None:
        if not self.written:
            self._write_meta()
        self.records[record["key"]] = record
        text = "".join(_canonical(_strict(r)) + "\n" for r in self.records.values())
        _atomic_write(self.points, text)


# ----------------------------------------------------------------------------- one point
def _finite(v):
    v = float(v)
    return v if math.isfinite(v) else None


def run_point(arch: MLP, x, y, *, seed: int, settings: dict) -> dict:
    """Train an ensemble of ``arch`` on ``(x, y)``, compare it with the fixed point and add the
    perturbative predictions: one sweep point.

    Args:
      arch: the architecture at this point.
      x, y: inputs and targets.
      seed: the ensemble's seed (``jax.random.key(seed)``).
      settings: ``steps`` (``0``: compare the freshly drawn ensemble, no training),
        ``learning_rate``, ``optimizer``, ``loss``, ``n_networks``, ``predict``.

    Returns:
      ``dict(measures={name: dict(value, se, predicted, ...)}, couplings=[L+1] or None,
      layers={name: [L+1 values]}, end_of_training=dict(applies, reason))`` (the last for
      trained networks only: whether an end-of-training O(1/n) prediction applied and, if not,
      why; :func:`_end_of_training`).

    **A measure's record** (what a custom ``point`` function returns, and what
    :func:`rgnn.classify` holds against each other): ``value`` and ``se`` (the measurement and
    its standard error, ``None`` when there is none, e.g. one network), ``predicted`` (its
    O(1/n) prediction at this width, or ``None``), and optionally ``predicted_se`` (the
    prediction's own uncertainty, e.g. quadrature) and ``allowance`` (the absolute difference
    the neglected O(1/n^2) terms may make; by default :func:`rgnn.classify` allows
    ``max(prediction_rtol, second_order * depth/width) * |predicted|``).
    """
    return _adapter(arch, x, y, seed=seed, settings=settings)


def _adapter(arch: MLP, x, y, *, seed: int, settings: dict) -> dict:
    """The one place that calls the comparator: :func:`rgnn.train` then :func:`rgnn.compare`
    (or, with ``steps = 0``, :func:`rgnn.compare` on the freshly drawn ensemble), reduced to
    the scalars of :data:`MEASURES` at the last recorded step."""
    from rgnn._validate import check_inputs
    from rgnn.compare import compare
    from rgnn.networks import ensemble
    from rgnn.training import ensemble_kernels, train

    x = check_inputs(x, "x")
    key = jax.random.key(seed)
    steps = settings["steps"]
    if steps == 0:
        record = ensemble(
            arch, x.shape[1], n_networks=settings["n_networks"], key=key, dtype=x.dtype
        )
        y = None
    else:
        with warnings.catch_warnings():  # a divergence becomes the ValueError below
            warnings.filterwarnings("ignore", "training diverged", RuntimeWarning)
            record = train(
                arch,
                x,
                y,
                steps=steps,
                learning_rate=settings["learning_rate"],
                optimizer=settings["optimizer"],
                loss=settings["loss"],
                n_networks=settings["n_networks"],
                key=key,
                record_steps=[steps],
            )
        if record.diverged_at >= 0:
            width = max(arch.widths) if isinstance(arch, MLP) else arch.width
            raise ValueError(
                f"learning_rate: training diverged at step {record.diverged_at} with "
                f"learning_rate={settings['learning_rate']} ({arch.parameterization}, width "
                f"{width}); choose a smaller learning rate"
            )
    predict = settings.get("predict", True) and settings["n_networks"] >= 4
    shared = _shared_flow(arch, x) if predict else None
    cmp = compare(arch, x, record, perturbative=predict if shared is None else shared)
    out = _summarize(cmp, y, trained=steps > 0)
    ntk0 = (record.ntk[0] if steps > 0 else ensemble_kernels(record, x)[1])[:, -1]
    out["measures"]["ntk_fluctuation"] = _ntk_fluctuation(
        arch, x, ntk0, predict=predict, shared=shared
    )
    if steps > 0:
        eot = _end_of_training(arch, x, y, settings)
        if isinstance(eot, str):  # no prediction applies, and why
            out["end_of_training"] = dict(applies=False, reason=eot)
        elif eot is not None:
            out["end_of_training"] = dict(applies=True, reason="")
            out["measures"].update(_trained_predictions(eot, cmp, n_train=x.shape[0]))
    return out


def _shared_flow(arch, x):
    """One :func:`rgnn.perturbative` call (kernel and NTK sides) that serves both the
    comparator's kurtosis and kernel-variance predictions and the NTK-fluctuation prediction of
    :func:`_ntk_fluctuation`, or ``None`` where they are computed apart: a model or muP (no NTK
    prediction; the comparator uses the NTK-parameterized twin's kernel side) and a nonlinear
    residual MLP (its NTK side on several inputs is a costly pair flow of which only the
    diagonal is used: :func:`_ntk_fluctuation` takes it from one-input flows instead)."""
    if not isinstance(arch, MLP) or arch.parameterization == "mup":
        return None
    if arch.is_residual and arch.act.name != "linear":
        return None
    from rgnn.perturbative import perturbative

    return perturbative(arch, x, warn=False)


def _ntk_fluctuation(arch: MLP, x, ntk0, *, predict: bool, shared=None) -> dict:
    """The ``ntk_fluctuation`` measure at initialization, with its O(1/n) prediction.

    Measured: ``r = mean_a Var(Theta_aa) / mean(Theta_aa)^2`` over the ``M`` networks' output
    NTKs ``ntk0`` (``[M, N, N]``; unbiased variance), the standard error by the delete-one
    jackknife over networks. Predicted (PDLT ch. 8, :attr:`rgnn.Perturbative.ntk_variance`):
    ``mean_a ntk_variance_aa / Theta_aa^2`` on the output layer, which is ``r`` at O(1/n) (the
    mean's own O(1/n) shift enters the ratio at O(1/n^2)). For relu the exact ratio grows like
    ``exp(c L / n)`` (Hanin & Nica 2019) while this prediction is linear in ``L / n``: the
    deep-and-narrow witness of :func:`rgnn.classify`. No prediction under muP (its NTK is not
    the NTK-parameterized twin's), for a model (no 1/n rules: :mod:`rgnn.models`), or without
    ``predict`` (a residual MLP has it on any inputs: a nonlinear one from the one-input flow
    of :mod:`rgnn._residual_single` on each input, which is the diagonal of the pair flow of
    :mod:`rgnn._residual_multi` without its cost); ``predicted_se`` is the prediction's
    quadrature error. ``shared``: the :func:`rgnn.perturbative` result of ``arch`` on ``x``
    when :func:`_shared_flow` computed one."""
    d = np.asarray(np.diagonal(np.asarray(ntk0), axis1=-2, axis2=-1), float)  # [M, N]
    m = d.shape[0]
    value = se = None
    if m >= 2:

        def ratio(a):
            return float(np.mean(np.var(a, 0, ddof=1) / np.mean(a, 0) ** 2))

        value = ratio(d)
        if m >= 3:
            jack = np.array([ratio(np.delete(d, i, 0)) for i in range(m)])
            se = float(np.sqrt((m - 1) / m * np.sum((jack - jack.mean()) ** 2)))
    predicted = predicted_se = None
    has_rules = isinstance(arch, MLP) and arch.parameterization != "mup"
    if predict and has_rules:
        from rgnn.perturbative import perturbative

        if shared is not None:
            parts = [shared]
        elif arch.is_residual and arch.act.name != "linear":
            parts = [perturbative(arch, x[a : a + 1], warn=False) for a in range(x.shape[0])]
        else:
            parts = [perturbative(arch, x, warn=False)]
        var = np.concatenate([np.diagonal(np.asarray(p.ntk_variance[-1], float)) for p in parts])
        theta = np.concatenate([np.diagonal(np.asarray(p.ntk[-1], float)) for p in parts])
        predicted = float(np.mean(var / theta**2))
        predicted_se = abs(predicted) * max(float(p.quadrature_error) for p in parts)
    return dict(
        value=_finite(value) if value is not None else None,
        se=_finite(se) if se is not None else None,
        predicted=_finite(predicted) if predicted is not None else None,
        predicted_se=_finite(predicted_se) if predicted_se is not None else None,
    )


# ============================================================================================
# THE PLUG-IN POINT for the trained-network predictions (issue: the end of training at O(1/n)).
# `_end_of_training` is the one place that calls `rgnn.end_of_training`; `_trained_predictions`
# turns its result into measures with predictions. Where no prediction applies (relu, too many
# training inputs, another optimizer...) it returns the reason, which the razor prints.
# ============================================================================================
#: The most training inputs for which the sweep computes the end-of-training prediction: its
#: full-field statistics grow like ``C(N + 1, 4)`` four-input quadratures per layer step in
#: time (the bulk of it) and ``N^4`` in memory. Measured on a loaded 2-core machine, compilation
#: included in first calls: tanh depth 2, one test input, statistics run twice (before the
#: error estimate moved to a 6-input subset, see :func:`rgnn.perturbative`; load ~5): 4 inputs
#: 24 s, 8: 56 s, 12: 38 s, 16: 56 s, 24: 64 s, 32: 156 s. Run once (load ~16, about three
#: times slower): 24 inputs, depth 2, 193 s first call, 78.5 s second; 32 + 2 inputs, depth 3,
#: 663 s / 547 s. The limit keeps a sweep group's prediction near a minute on a quieter
#: machine; above it the razor says so. From 13 inputs on the three/four-input rule has 12
#: nodes per dimension (``quadrature_order_multi`` of :func:`rgnn.end_of_training` raises it;
#: tanh depth 3 on 12 + 2 inputs: its trapezoid rule leaves 7.7% on the worst output's
#: correction at 12 nodes, 1.3% at 16).
END_OF_TRAINING_MAX_INPUTS = 24

#: The same limit for a nonlinear (smooth) residual MLP, whose full statistics run the set flows
#: of ``rgnn._residual_multi`` one four-subset of the inputs at a time (``C(N + 1, 4)`` sets,
#: rgnn.perturbative): far costlier per input. Measured on a loaded 2-core machine (load 8 to
#: 10), tanh depth 2, compilation included: 2 + 1 inputs (one set) 56 s; 4 + 2 inputs (15 sets)
#: 471 s; a sweep point with 4 training inputs (5 sets, training included) 484 s wall, 146 s CPU.
#: 5 training inputs (15 sets) keep a sweep group's prediction within minutes.
END_OF_TRAINING_MAX_INPUTS_RESIDUAL = 5

# The computed predictions, keyed by everything but the width (the prediction's O(1/n) part is
# ``c / n`` with ``c`` width independent for equal hidden widths): a sweep group computes the
# costly statistics once and divides by each width. Small: a sweep visits one group at a time.
_EOT_CACHE: dict = {}
_EOT_CACHE_SIZE = 8
_EOT_SCALED = (
    "correction",
    "correction_ntk_mean",
    "correction_ntk_fluctuation",
    "correction_dntk",
    "correction_ddntk1",
    "correction_ddntk2",
    "train_correction",
    "ntk_change",
)


def _kinked(arch: MLP) -> bool:
    """Whether ``arch``'s activation has a kink (relu, leaky relu): the test
    :func:`rgnn.end_of_training` uses to set ``scaling`` to "not 1/n", made here before the
    costly statistics so that the main job's relu sweep learns it at no cost."""
    act = arch.act
    return bool(act.scale_invariant and act.negative_slope not in (None, 1.0))


def _probe_input(x: np.ndarray) -> np.ndarray:
    """The one test input of the sweep's prediction, whose outputs are not used (only the
    training block of ``ntk_change`` is): a fixed random direction at the training inputs' rms
    norm, ``[1, n_0]``. Generic on purpose: a copy of a training input makes the set kernels
    of a nonlinear residual MLP's full layout singular (its fields NaN, rgnn.perturbative)."""
    d = np.random.default_rng(0).standard_normal(x.shape[1])
    norm = math.sqrt(float(np.mean(np.sum(np.square(x, dtype=float), axis=1))))
    return (d / np.linalg.norm(d) * norm)[None].astype(x.dtype)


def _end_of_training(arch: MLP, x, y, settings: dict):
    """The O(1/n) end-of-training prediction for the networks of this point
    (:func:`rgnn.end_of_training` with ``steps=settings["steps"]``, one test input
    (:func:`_probe_input`): only the training block of ``ntk_change`` is used), or a sentence
    saying why none applies.

    A prediction applies to an :class:`~rgnn.MLP` in the NTK parameterization trained with
    ``optimizer="gd"``, ``loss="mse"``, whose trained departure scales like ``1/n``
    (``EndOfTraining.scaling``; not relu and leaky relu, measured ~``n^-0.5``), on at most
    :data:`END_OF_TRAINING_MAX_INPUTS` training inputs (the statistics cost ``~N^5``;
    :data:`END_OF_TRAINING_MAX_INPUTS_RESIDUAL` for a nonlinear residual MLP), with
    ``predict`` on. The statistics are computed once per sweep group: for equal hidden widths
    the prediction's O(1/n) fields are ``c / n`` with ``c`` width independent, so the result
    at one width is rescaled to the others (``_EOT_CACHE``).

    Returns:
      An :class:`rgnn.EndOfTraining`, or a ``str``: the reason no trained-network prediction
      applies (recorded in the point's ``end_of_training`` and printed by the razor).
    """
    if not isinstance(arch, MLP):
        return (
            f"{type(arch).__name__}: the end-of-training prediction covers rgnn.MLP "
            "architectures only"
        )
    from rgnn.training_theory import _full_statistics_missing, end_of_training

    why = []  # every cheap reason, so that the printout names them all
    missing = _full_statistics_missing(arch)
    if missing is not None:
        why.append(missing)
    if not settings.get("predict", True):
        why.append("predictions are off (predict=False)")
    if settings["optimizer"] != "gd" or settings["loss"] != "mse":
        why.append(
            f"optimizer {settings['optimizer']!r}, loss {settings['loss']!r}: the end-of-training "
            "prediction covers full-batch gradient descent on the mse loss only"
        )
    if arch.parameterization != "ntk":
        why.append(
            f"{arch.parameterization} parameterization: the end-of-training prediction covers "
            "the NTK parameterization only (width-independent NTK and learning rate)"
        )
    if _kinked(arch):
        why.append(
            f"{arch.act.name}: trained departure not 1/n (a finite step moves units across the "
            "kink; measured ~n^-0.5 by Monte Carlo), so no O(1/n) prediction describes it"
        )
    n_train = int(x.shape[0])
    if arch.is_residual and arch.act.name != "linear":  # rgnn.perturbative's set flows
        if n_train > END_OF_TRAINING_MAX_INPUTS_RESIDUAL:
            why.append(
                f"{n_train} training inputs: above the end-of-training limit of "
                f"{END_OF_TRAINING_MAX_INPUTS_RESIDUAL} for a nonlinear residual MLP (its "
                "statistics run one set flow per four-subset of the inputs: C(N + 1, 4) of "
                "them)"
            )
    elif n_train > END_OF_TRAINING_MAX_INPUTS:
        why.append(
            f"{n_train} training inputs: above the end-of-training limit of "
            f"{END_OF_TRAINING_MAX_INPUTS} (its statistics cost ~N^5 time and ~N^4 memory per "
            "layer)"
        )
    if why:
        return "; ".join(why)
    widths = tuple(int(w) for w in arch.widths)
    uniform = len(set(widths)) == 1
    xa, ya = np.asarray(x), np.asarray(y)
    key = (
        repr(dataclasses.replace(arch, width=1)) if uniform else repr(arch),
        _data_hash(xa, ya),
        str(xa.dtype),
        float(settings["learning_rate"]),
        int(settings["steps"]),
    )
    if key not in _EOT_CACHE:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "end_of_training:", UserWarning)
                # the razor weighs depth/width itself (TRUST_DEPTH_OVER_WIDTH)
                warnings.filterwarnings("ignore", "depth/width", UserWarning)
                eot = end_of_training(
                    arch,
                    x,
                    y,
                    _probe_input(xa),
                    learning_rate=settings["learning_rate"],
                    steps=int(settings["steps"]),
                )
        except ValueError as err:
            eot = f"not computed: {err}"
        if not isinstance(eot, str) and not eot.valid:
            eot = f"{arch.act.name}: {eot.scaling}"
        if not isinstance(eot, str):
            block = np.asarray(eot.ntk_change)[:n_train, :n_train]
            if not np.all(np.isfinite(block)):
                eot = (
                    "not computed: the statistics on the training inputs are not finite "
                    "(duplicate or parallel training inputs?)"
                )
        if len(_EOT_CACHE) >= _EOT_CACHE_SIZE:
            _EOT_CACHE.pop(next(iter(_EOT_CACHE)))
        _EOT_CACHE[key] = (widths[-1], eot)
    n_ref, eot = _EOT_CACHE[key]
    if isinstance(eot, str) or n_ref == widths[-1]:
        return eot
    factor = n_ref / widths[-1]
    return dataclasses.replace(
        eot,
        width=widths[-1],
        **{f: getattr(eot, f) * factor for f in _EOT_SCALED},
    )


def _trained_predictions(eot, cmp, *, n_train: int) -> dict:
    """Measures of the trained ensemble held against an end-of-training prediction ``eot``
    (:func:`_end_of_training`; ``None`` gives none):

    * ``mean_ntk_movement = ||<Theta_T - Theta_0>|| / ||<Theta_0>||`` on the training inputs,
      output layer (:attr:`rgnn.Comparison.mean_ntk_movement`, jackknife bias-corrected, so
      an estimate of the norm of the expectation) against
      ``||ntk_change[:N, :N]|| / ||Theta_inf||``, its O(1/n) prediction (the denominators
      differ at O(1/n), the ratio at O(1/n^2)).

    The mean departure of ``f_T`` from the network's own infinite-width linearization,
    ``E[f_T - f_lin,T]``, is ``eot.correction`` on *test* inputs (on the training inputs both
    reach the targets); it becomes a measure once the sweep trains with test inputs
    (``rms(<f_T - f_lin,T>) / rms(y)`` on them, :attr:`rgnn.Comparison.mean_test_gap`, against
    ``rms(correction) / rms(y)``).
    """
    if eot is None:
        return {}
    change = np.asarray(eot.ntk_change, float)[:n_train, :n_train]
    ref = np.asarray(cmp.reference_ntk, float)[-1]
    predicted = float(np.linalg.norm(change) / np.linalg.norm(ref))
    v = np.asarray(cmp.mean_ntk_movement, float)[-1, -1]
    s = np.asarray(cmp.mean_ntk_movement_se, float)[-1, -1]
    return dict(
        mean_ntk_movement=dict(value=_finite(v), se=_finite(s), predicted=_finite(predicted))
    )


def _summarize(cmp, y, *, trained: bool) -> dict:
    """Scalars of :data:`MEASURES` from a :class:`rgnn.compare.Comparison`: the last recorded
    step, the output layer ``L+1`` (kernel measures), averaged over inputs (kurtosis)."""

    def arr(a):
        return np.asarray(a, float)

    measures, layers = {}, {}
    for name in ("nngp_distance", "ntk_distance") + (("ntk_movement",) if trained else ()):
        v, s = arr(getattr(cmp, name))[-1], arr(getattr(cmp, name + "_se"))[-1]
        measures[name] = dict(value=_finite(v[-1]), se=_finite(s[-1]), predicted=None)
        layers[name] = [_finite(a) for a in v]
    if trained and y is not None:
        scale = float(np.sqrt(np.mean(np.asarray(y, float) ** 2))) or 1.0
        g, gs = arr(cmp.gap)[-1], arr(cmp.gap_se)[-1]
        measures["function_gap"] = dict(
            value=_finite(g / scale), se=_finite(gs / scale), predicted=None
        )
    k, ks, kp = arr(cmp.kurtosis), arr(cmp.kurtosis_se), arr(cmp.kurtosis_predicted)
    # the mean over inputs; its standard error bounded by the mean of the per-input ones
    # (perfectly correlated inputs), since the inputs share the same networks
    measures["kurtosis"] = dict(
        value=_finite(k[-1].mean()),
        se=_finite(ks[-1].mean()),
        predicted=_finite(kp[-1].mean()),
    )
    layers["kurtosis"] = [_finite(a) for a in k.mean(1)]
    layers["kurtosis_predicted"] = [_finite(a) for a in kp.mean(1)]
    couplings = [_finite(a / 3) for a in kp.mean(1)]  # V_aaaa / (n K_aa^2), input-averaged
    return dict(measures=measures, layers=layers, couplings=couplings)


_register(
    Measure(
        "ntk_movement",
        -0.5,
        "||Theta_t - Theta_0|| / ||Theta_0||, output layer",
    ),
    Measure(
        "function_gap",
        -0.5,
        "rms(f_t - f_lin,t) / rms(y), f_lin: infinite-width NTK",
    ),
    Measure(
        "ntk_distance",
        -0.5,
        "||Theta_t - Theta_inf|| / ||Theta_inf||, output layer",
    ),
    Measure(
        "nngp_distance",
        -0.5,
        "||G_t - K|| / ||K||, output layer",
    ),
    Measure(
        "kurtosis",
        -1.0,
        "excess kurtosis of the output at init",
        threshold=0.15,
        predicted=True,
    ),
    Measure(
        "ntk_fluctuation",
        -1.0,
        "Var(Theta_aa) / E[Theta_aa]^2 at init, output layer",
        threshold=0.05,
        predicted=True,
    ),
    Measure(
        "mean_ntk_movement",
        -1.0,
        "||<Theta_T - Theta_0>|| / ||<Theta_0>||, output layer (with an end-of-training "
        "prediction only)",
        predicted=True,
    ),
)


# ----------------------------------------------------------------------------- the sweep
@dataclasses.dataclass(frozen=True)
class Sweep:
    """A finished (or resumed) sweep.

    Not a pytree: it is a table of heterogeneous JSON records read from and written to disk;
    its numbers are in :attr:`fits` (pytrees) and :meth:`table`.

    Attributes:
      config: the sweep's configuration (what its hash covers).
      records: one dict per finished point, in grid order: ``key``, ``point`` (depth, width,
        activation, parameterization, learning_rate, seed), ``measures`` (name ->
        ``{value, se, predicted}``), ``layers`` (name -> per-layer values), ``couplings``
        (``[L+1]`` perturbative quartic coupling, or ``None``), ``depth_over_width``,
        ``seconds``, and for trained points ``end_of_training`` (``applies``, ``reason``:
        whether an end-of-training O(1/n) prediction applied, and why not).
      fits: one :class:`ScalingFit` per group and measure.
      out: the results directory, or ``None``.
    """

    config: dict
    records: tuple
    fits: tuple
    out: str | None = None

    @property
    def description(self) -> str:
        """One line for titles: depth, activation, parameterization, learning rate, steps,
        ensemble size and seeds (an axis that varies as ``a/b``), and the base variances."""
        c = self.config

        def axis(key):
            return "/".join(str(v) for v in c[key])

        st, base = c["settings"], c["base"]
        steps = (
            "at initialization" if st["steps"] == 0 else f"{st['steps']} steps {st['optimizer']}"
        )
        return (
            f"depth {axis('depths')}, {axis('activations')}, {axis('parameterizations')} "
            f"parameterization, learning rate {axis('learning_rates')}, {steps}, "
            f"{st['n_networks']} networks x {len(c['seeds'])} seed(s); "
            f"C_W={base['weight_var']:g}, C_b={base['bias_var']:g}"
        )

    @property
    def groups(self) -> tuple[dict, ...]:
        """The distinct groups (settings of :data:`GROUP_FIELDS`), in grid order."""
        seen = {}
        for r in self.records:
            g = tuple((f, r["point"][f]) for f in GROUP_FIELDS)
            seen.setdefault(g, None)
        return tuple(dict(g) for g in seen)

    @property
    def measures(self) -> tuple[str, ...]:
        """Names of the measures the points report."""
        names = {}
        for r in self.records:
            for k in r["measures"]:
                names.setdefault(k, None)
        known = list(MEASURES)
        return tuple(sorted(names, key=lambda k: known.index(k) if k in known else len(known)))

    def records_of(self, group: dict) -> list[dict]:
        """The records of one group."""
        return [r for r in self.records if all(r["point"][f] == group[f] for f in GROUP_FIELDS)]

    def fits_of(self, group: dict) -> dict[str, ScalingFit]:
        """``{measure: ScalingFit}`` of one group."""
        key = tuple((f, group[f]) for f in GROUP_FIELDS)
        return {f.measure: f for f in self.fits if f.group == key}

    def table(self) -> list[dict]:
        """One row per group and width: the group, ``width``, ``n_seeds``,
        ``depth_over_width``, and for each measure its seed mean, standard error and (where
        the points carry them) the perturbative prediction ``<name>_predicted``, its
        uncertainty ``<name>_predicted_se`` and allowance ``<name>_allowance`` (seed means)."""
        rows = []
        for g in self.groups:
            recs = self.records_of(g)
            for width in sorted({r["point"]["width"] for r in recs}):
                at = [r for r in recs if r["point"]["width"] == width]
                row = dict(g, width=width, n_seeds=len(at))
                row["depth_over_width"] = at[0]["depth_over_width"]
                for name in self.measures:
                    have = [r["measures"][name] for r in at if name in r["measures"]]
                    vals = [m["value"] for m in have if m["value"] is not None]
                    if not vals:
                        continue
                    ses = [m["se"] if m["se"] is not None else float("nan") for m in have]
                    mean, se = pool_seeds(vals, ses[: len(vals)])
                    row[name] = mean
                    row[name + "_se"] = se
                    for extra in ("predicted", "predicted_se", "allowance"):
                        got = [m.get(extra) for m in have if m.get(extra) is not None]
                        if got:
                            row[f"{name}_{extra}"] = float(np.mean(got))
                rows.append(row)
        return rows


def _grid(widths, seeds, depths, activations, parameterizations, learning_rates):
    for depth, act, par, lr, width, seed in itertools.product(
        depths, activations, parameterizations, learning_rates, widths, seeds
    ):
        yield dict(
            depth=depth,
            activation=act,
            parameterization=par,
            learning_rate=lr,
            width=width,
            seed=seed,
        )


def _check_list(name, values, kind, *, positive=False):
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty list, got {values!r}")
    out = []
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
            raise ValueError(f"{name}: expected integers, got {v!r}")
        if kind is float:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected numbers, got {v!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"{name}: expected finite numbers, got {v!r}")
        if positive and not v > 0:
            raise ValueError(f"{name}: expected positive values, got {v!r}")
        out.append(kind(v) if kind is not str else v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: expected distinct values, got {list(values)}")
    return out


def _arch_at(base: MLP, p: dict, custom: dict | None = None) -> MLP:
    if not isinstance(base, MLP):  # a model family: only the width varies
        return base.at_width(p["width"])
    return dataclasses.replace(
        base,
        depth=p["depth"],
        width=p["width"],
        activation=(custom or {}).get(p["activation"], p["activation"]),
        parameterization=p["parameterization"],
    )


def activation_label(activation) -> str:
    """The sweep's stored name of an activation: a registry name as it is; a callable or an
    :class:`~rgnn.activations.Activation` as ``"<name>@<fingerprint>"``, the fingerprint being
    the SHA-256 of its values at 41 points of ``[-4, 4]`` in float64 (12 significant digits).

    The label identifies the function by what it computes, not by its object identity (which
    does not survive the process): a sweep with a custom activation resumes in a new process
    when the activation passed computes the same values, and a different function with the
    same ``__name__`` (every lambda is ``<lambda>``) gets another label, so its points are
    never mixed with the old ones (the directory is refused as holding another sweep).
    """
    from rgnn.activations import get_activation

    if isinstance(activation, str):
        return activation
    act = get_activation(activation)
    with jax.enable_x64(True):
        grid = jax.numpy.linspace(-4.0, 4.0, 41, dtype=jax.numpy.float64)
        values = np.asarray(act.fn(grid), np.float64)
    text = ",".join(f"{v:.12g}" for v in values.ravel())
    return f"{act.name}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _model_sweep_base(arch, depths, activations, parameterizations):
    """A model family for :func:`sweep` (``None`` for an MLP): a :class:`rgnn.models.Model`
    with ``at_width``, or a function ``width -> triple | model | nnx module``."""
    from rgnn import models

    if isinstance(arch, MLP):
        return None
    if isinstance(arch, models.Model):
        base = arch
    elif callable(arch) and not models.is_model_like(arch):
        base = models.as_family(arch)
    else:
        what = "a stax triple" if isinstance(arch, tuple) else type(arch).__name__
        raise ValueError(
            f"arch: expected an rgnn.MLP, a model family (rgnn.models.cnn(...), a "
            f"rgnn.models.Model with at_width) or a function from width to a network, got "
            f"{what} (one network: sweeps need a family of widths)"
        )
    for name, v in (
        ("depths", depths),
        ("activations", activations),
        ("parameterizations", parameterizations),
    ):
        if v is not None:
            raise ValueError(f"{name}: a model family sweeps widths only; expected None")
    return base


def _fits(config, records) -> tuple:
    fits = []
    partial = Sweep(config, tuple(records), ())
    for g in partial.groups:
        rows = [r for r in partial.table() if all(r[f] == g[f] for f in GROUP_FIELDS)]
        for name in partial.measures:
            pts = [(r["width"], r[name], r[name + "_se"]) for r in rows if name in r]
            if len({w for w, _, _ in pts}) < 2:
                continue
            w, v, s = map(np.asarray, zip(*pts, strict=True))
            expected = MEASURES[name].expected_exponent if name in MEASURES else -1.0
            group = tuple((f, g[f]) for f in GROUP_FIELDS)
            fits.append(fit_scaling(w, v, s, expected=expected, measure=name, group=group))
    return tuple(fits)


def sweep(
    arch: MLP,
    x,
    y,
    *,
    widths: Sequence[int],
    seeds: Sequence[int] = (0, 1),
    depths: Sequence[int] | None = None,
    activations: Sequence[str] | None = None,
    parameterizations: Sequence[str] | None = None,
    learning_rates: Sequence[float] = (0.1,),
    steps: int = 100,
    n_networks: int = 8,
    optimizer: str = "gd",
    loss: str = "mse",
    predict: bool = True,
    out: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = True,
    point: Callable | None = None,
) -> Sweep:
    """Sweep ``arch`` over widths (and optionally depths, activations, parameterizations and
    learning rates) and seeds; fit each measure against width.

    Args:
      arch: the base architecture; its depth, activation and parameterization are used when
        the corresponding list is ``None``, and its width is replaced by each of ``widths``.
        Or a model family: :func:`rgnn.models.cnn` (``rgnn sweep --arch cnn``), any
        :class:`rgnn.models.Model` with ``at_width``, or a function from width to a
        neural-tangents stax triple, a flax nnx module (with an ``rngs`` keyword to draw
        ensembles) or a model; only widths (and learning rates, seeds) are swept, the kernel
        measures are the output layer's, the kurtosis has no O(1/n) prediction (the sweep's
        fits measure its 1/n coefficient), and the family is stored by its kind, name and
        :func:`rgnn.models.fingerprint` (resuming needs a family that computes the same).
      x, y: ``[N, n_0]`` inputs and ``[N, out_dim]`` (or ``[N]``) targets.
      widths: at least two hidden widths (four or more for a trustworthy exponent).
      seeds: ensemble seeds; each point trains ``n_networks`` networks from
        ``jax.random.key(seed)``.
      depths, activations, parameterizations: further sweep axes. Activations may be names,
        :class:`~rgnn.activations.Activation` objects or callables, stored as
        :func:`activation_label` (resume works across processes for a custom activation that
        computes the same values).
      learning_rates: the learning-rate axis.
      steps, n_networks, optimizer, loss: training settings (:func:`rgnn.train`); ``steps = 0``
        measures the networks at initialization.
      predict: compute the O(1/n) predictions at initialization (:func:`rgnn.perturbative`,
        ``O(N^2 L)`` quadratures; needs ``n_networks >= 4`` for the measured side).
      out: the results directory (see the module docstring), or ``None`` to keep nothing.
      plots: write PNG plots into ``out``.
      progress: report progress on stderr: a bar with an ETA on a terminal, one log line per
        finished point otherwise (:class:`rgnn.progress.Progress`); ``False``: silent.
      point: the per-point function ``point(arch, x, y, *, seed, settings) -> dict``
        (default :func:`run_point`).

    Returns:
      A :class:`Sweep`. ``KeyboardInterrupt`` propagates after the finished points are saved.

    The measures each point reports are ``sweep.MEASURES`` (``rgnn.sweep.MEASURES``, the same
    dict as :data:`MEASURES`).
    """
    from rgnn._validate import check_inputs

    family = _model_sweep_base(arch, depths, activations, parameterizations)

    xa = check_inputs(x, "x")
    ya = np.asarray(y)
    if ya.ndim == 1:
        ya = ya[:, None]
    if ya.ndim != 2 or ya.shape[0] != xa.shape[0]:
        raise ValueError(
            f"y: expected [{xa.shape[0]}, out_dim] targets to match x, got shape {ya.shape}"
        )
    widths = sorted(_check_list("widths", widths, int, positive=True))
    if len(widths) < 2:
        raise ValueError(f"widths: expected at least 2 widths, got {widths}")
    seeds = _check_list("seeds", seeds, int)
    custom, first = {}, None
    if family is not None:
        at_width = family.at_width if hasattr(family, "at_width") else family
        first = at_width(widths[0])
        depths, activations = [first.depth], [first.activation]
        parameterizations = [first.parameterization]
        arch = _FamilyBase(at_width)
    else:
        depths = _check_list(
            "depths", [arch.depth] if depths is None else depths, int, positive=True
        )
        if activations is None:
            activations = [arch.act.name if isinstance(arch.activation, str) else arch.activation]
        if isinstance(activations, str | bytes) or not isinstance(activations, Sequence):
            raise ValueError(f"activations: expected a non-empty list, got {activations!r}")
        labels = []
        for a in activations:
            label = activation_label(a)
            if not isinstance(a, str):
                custom[label] = a
            labels.append(label)
        activations = _check_list("activations", labels, str)
        parameterizations = _check_list(
            "parameterizations",
            [arch.parameterization] if parameterizations is None else parameterizations,
            str,
        )
    for par in parameterizations if family is None else ():
        if par not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterizations: expected some of {PARAMETERIZATIONS}, got {par!r}"
            )
    learning_rates = _check_list("learning_rates", learning_rates, float, positive=True)
    for name, v in (("steps", steps), ("n_networks", n_networks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
            what = "non-negative" if name == "steps" else "positive"
            raise ValueError(f"{name}: expected a {what} integer, got {v!r}")
    from rgnn.training import LOSSES, OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if loss == "cross_entropy" and not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(
            "loss: 'cross_entropy' expects integer class labels y, got real-valued targets "
            f"({np.asarray(y).dtype}); use loss='mse'"
        )
    for a in activations if family is None else ():  # fail before any work on an unknown name
        _arch_at(
            arch,
            dict(
                depth=depths[0],
                width=widths[0],
                activation=a,
                parameterization=parameterizations[0],
            ),
            custom,
        )

    settings = dict(
        steps=steps,
        n_networks=n_networks,
        optimizer=optimizer,
        loss=loss,
        predict=bool(predict),
    )
    if family is None:
        base = dict(
            weight_var=arch.weight_var,
            bias_var=arch.bias_var,
            out_dim=arch.out_dim,
            use_bias=arch.use_bias,
            # residual factors only when given: a plain sweep's keys stay as they were
            **(
                dict(shortcut=arch.shortcut, branch=arch.branch)
                if arch.shortcut is not None
                else {}
            ),
        )
    else:
        from rgnn.models import fingerprint

        # a model family is stored by kind, name and a fingerprint of what it computes at the
        # first width (rgnn.models.fingerprint): resuming needs the same family, not the
        # same Python object
        base = dict(model=first.kind, name=first.name, fingerprint=fingerprint(first, xa))
    config = dict(
        base=base,
        data=dict(hash=_data_hash(np.asarray(xa), ya), n=int(xa.shape[0]), dtype=str(xa.dtype)),
        widths=widths,
        seeds=seeds,
        depths=depths,
        activations=activations,
        parameterizations=parameterizations,
        learning_rates=learning_rates,
        settings=settings,
    )
    store = _Store(out, config) if out is not None else None
    point_fn = run_point if point is None else point
    grid = list(_grid(widths, seeds, depths, activations, parameterizations, learning_rates))
    # an extended folder: the union of the grids, of which this call computes its own points
    full_grid = grid if store is None else list(_grid_from_config(store.config))

    def key_of(p):
        return _hash(dict(point=p, base=config["base"], data=config["data"], settings=settings))

    from rgnn.progress import Progress

    bar = Progress(len(grid), label="sweep", stream=sys.stderr if progress else io.StringIO())
    records = []
    try:
        for p in grid:
            k = key_of(p)
            note = " ".join(f"{f}={p[f]}" for f in ("width", "seed"))
            if store is not None and k in store.records:
                records.append(store.records[k])
                bar.skip(1, note)
                continue
            bar.start_item(note)
            a = _arch_at(arch, p, custom)
            start = time.perf_counter()
            settings_p = dict(settings, learning_rate=p["learning_rate"])
            result = point_fn(a, xa, ya, seed=p["seed"], settings=settings_p)
            seconds = time.perf_counter() - start
            record = dict(
                key=k,
                point=p,
                measures=result["measures"],
                layers=result.get("layers", {}),
                couplings=result.get("couplings"),
                depth_over_width=_depth_over_width(a),
                seconds=seconds,
            )
            if result.get("end_of_training") is not None:  # whether a trained prediction applied
                record["end_of_training"] = result["end_of_training"]
            record = _strict(record)  # as it is stored: NaN -> None
            if store is not None:
                store.add(record)
            records.append(record)
            bar.advance(seconds, note)
    finally:
        bar.close()
    if store is not None and not store.written:  # every point was already there
        store._write_meta()  # the union of the axes
    if store is not None and len(full_grid) > len(grid):
        records = [store.records[key_of(p)] for p in full_grid if key_of(p) in store.records]
    final = config if store is None else store.config
    result = Sweep(final, tuple(records), _fits(final, records), str(out) if out else None)
    if store is not None:
        write_outputs(result, plots=plots)
    return result


@dataclasses.dataclass(frozen=True)
class _FamilyBase:
    """A model family in :func:`sweep`: ``at_width(width) -> Model``."""

    at_width: Callable


def _depth_over_width(a) -> float:
    if isinstance(a, MLP):
        return float(np.sum(1.0 / np.asarray(a.widths, float)))
    return float(a.depth_over_width)


sweep.MEASURES = MEASURES
"""``rgnn.sweep.MEASURES``: the measures a sweep point reports (:data:`MEASURES`), reachable
from the public function as the README writes it."""


def load_sweep(out) -> Sweep:
    """Read a sweep's results directory (finished points only) back into a :class:`Sweep`."""
    path = Path(out)
    meta = path / "sweep.json"
    if not meta.exists():
        raise ValueError(f"out: {str(path)!r} holds no sweep (no sweep.json)")
    config = json.loads(meta.read_text())["config"]
    points = path / "points.jsonl"
    recs = []
    if points.exists():
        recs = [json.loads(line) for line in points.read_text().splitlines() if line.strip()]
    order = {_canonical(p): i for i, p in enumerate(_grid_from_config(config))}
    recs.sort(key=lambda r: order.get(_canonical(r["point"]), len(order)))
    return Sweep(config, tuple(recs), _fits(config, recs), str(path))


def _grid_from_config(config):
    return _grid(
        config["widths"],
        config["seeds"],
        config["depths"],
        config["activations"],
        config["parameterizations"],
        config["learning_rates"],
    )


# ----------------------------------------------------------------------------- outputs
def write_outputs(result: Sweep, *, plots: bool = True) -> list[Path]:
    """Write ``table.csv``, ``table.json`` (rows and fits) and, with ``plots``, one PNG per
    measure and ``couplings.png`` into ``result.out``. Returns the paths written."""
    out = Path(result.out)
    rows = result.table()
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    written = [out / "table.csv", out / "table.json"]
    _atomic_write(written[0], buf.getvalue())
    doc = dict(rows=rows, fits=[f.as_dict() for f in result.fits])
    _atomic_write(written[1], strict_json(doc, indent=2) + "\n")
    if plots:
        written += plot_sweep(result, out)
    return written


# ----------------------------------------------------------------------------- plots
def _group_label(g: dict, varying: list[str]) -> str:
    return ", ".join(f"{f}={g[f]}" for f in varying) or "all"


def plot_sweep(result: Sweep, out) -> list[Path]:
    """One log-log PNG per measure against width (``<measure>.png``; every group, the fitted
    ``c n^p`` with its slope, and the perturbative prediction: the measured O(1/n) prediction
    where the points carry one, else a line of the expected slope through the widest point),
    ``sweep.png`` with all measures side by side, and ``couplings.png``
    (:func:`rgnn.plotting.plot_couplings` for the sweep's activations at criticality, to depth
    10 or the sweep's largest depth)."""
    from rgnn.plotting import _subplots

    out = Path(out)
    groups = result.groups
    varying = [f for f in GROUP_FIELDS if len({g[f] for g in groups}) > 1]
    rows = result.table()
    names = list(result.measures)
    setting = result.description
    written = []
    has_couplings = any(c is not None for r in result.records for c in (r.get("couplings") or []))
    panels = len(names) + has_couplings  # the couplings in the last panel
    ncol = min(3 if panels <= 6 else 4, max(1, panels))
    nrow = max(1, math.ceil(panels / ncol))
    big, big_axes = _subplots(nrow, ncol, figsize=(5.6 * ncol, 4.4 * nrow), squeeze=False)
    for idx, name in enumerate(names):
        fig, ax = _subplots(figsize=(6.4, 4.8))
        for target in (ax, big_axes[idx // ncol, idx % ncol]):
            _plot_measure(target, result, rows, name, groups, varying)
        fig.suptitle(textwrap.fill(setting, 90), fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    free = list(range(len(names), nrow * ncol))
    if free and has_couplings:
        _plot_layer_couplings(big_axes[free[0] // ncol, free[0] % ncol], result)
        free = free[1:]
    for j in free:
        big_axes[j // ncol, j % ncol].set_visible(False)
    big.suptitle(
        f"{setting}\nmeans over networks (points), fitted n^p (solid), O(1/n) prediction with "
        "its allowance (crosses, band) or perturbative rates (dashed), threshold (grey dotted)",
        fontsize=11,
    )
    big.tight_layout()
    path = out / "sweep.png"
    big.savefig(path, dpi=90)
    written.append(path)
    from rgnn import plotting

    if "model" in result.config["base"]:  # no MLP coupling flow to draw for a model family
        return written
    acts = tuple(result.config["activations"])
    try:
        plotting.plot_couplings(
            out / "couplings.png",
            activations=acts,
            depth=max(max(result.config["depths"]), 10),  # the flow, beyond the sweep's depth
            width=min(result.config["widths"]),
            shortcuts=_plot_shortcuts(result.config["base"].get("shortcut")),
        )
        written.append(out / "couplings.png")
    except ValueError as err:  # an activation without a critical point
        warnings.warn(f"couplings.png not written: {err}", stacklevel=2)
    return written


def _plot_shortcuts(shortcut) -> tuple:
    """The residual shortcut of a sweep as :func:`rgnn.plotting.plot_couplings`'s
    ``shortcuts`` (one weight ``|gamma| < 1`` constant over the layers), else ``()``."""
    if isinstance(shortcut, int | float) and abs(shortcut) < 1:
        return (float(shortcut),)
    return ()


def _plot_measure(ax, result, rows, name, groups, varying):
    import matplotlib
    import matplotlib.ticker

    fits = {f.group: f for f in result.fits if f.measure == name}
    meta = MEASURES.get(name)
    for i, g in enumerate(groups):
        color = f"C{i}"
        pts = [r for r in rows if all(r[f] == g[f] for f in GROUP_FIELDS) and name in r]
        if not pts:
            continue
        w = np.array([r["width"] for r in pts], float)
        v = np.array([r[name] for r in pts], float)
        s = np.array([r[name + "_se"] for r in pts], float)
        pos = v > 0
        lab = _group_label(g, varying) + ": " if varying else ""  # one group: no prefix
        ax.errorbar(
            w[pos], v[pos], yerr=np.nan_to_num(s[pos]), fmt="o", color=color, ms=5, capsize=3
        )
        fit = fits.get(tuple((f, g[f]) for f in GROUP_FIELDS))
        grid = np.geomspace(w.min(), w.max(), 50)
        if fit is not None and np.isfinite(fit.exponent):
            ax.plot(
                grid,
                fit.prefactor * grid**fit.exponent,
                "-",
                color=color,
                label=f"{lab}fit: slope {fit.exponent:.2f} +- {fit.exponent_se:.2f}",
            )
        pred = np.array([r.get(name + "_predicted", np.nan) for r in pts], float)
        if np.any(np.isfinite(pred) & (pred > 0)):
            ok = np.isfinite(pred) & (pred > 0)
            # the razor's default allowance for O(1/n^2) terms (rgnn.regime)
            dow = np.array([r["depth_over_width"] for r in pts], float)
            allow = np.array([r.get(name + "_allowance", np.nan) for r in pts], float)
            allow = np.where(np.isfinite(allow), allow, np.maximum(0.25, dow) * np.abs(pred))
            ax.plot(w[ok], pred[ok], "x--", color=color, ms=7, label=f"{lab}O(1/n) prediction")
            lo = np.maximum(pred[ok] - allow[ok], pred[ok] * 1e-2)
            ax.fill_between(w[ok], lo, pred[ok] + allow[ok], color=color, alpha=0.12, lw=0)
        elif np.any(pos):
            # the perturbative rates through the widest point: n^-1 (a mean shift) to n^-1/2
            # (a single network's fluctuation)
            slow = meta.expected_exponent if meta else -1.0
            fast = meta.fastest_exponent if meta else slow
            anchor = np.flatnonzero(pos)[-1]
            lines = [v[anchor] * (grid / w[anchor]) ** e for e in (fast, slow)]
            ax.plot(grid, lines[0], "--", color=color, alpha=0.7, label=f"{lab}n^{fast:g}")
            if slow != fast:
                ax.plot(grid, lines[1], ":", color=color, alpha=0.7, label=f"{lab}n^{slow:g}")
                ax.fill_between(grid, lines[0], lines[1], color=color, alpha=0.08, lw=0)
    if meta is not None:
        ax.axhline(meta.threshold, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    widths = sorted({r["width"] for r in rows})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("width n", fontsize=11)
    ax.set_ylabel(name, fontsize=11)
    ax.set_title(f"{name}: {meta.description}" if meta else name, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no point has a value
        ax.legend(fontsize=9)


def _plot_layer_couplings(ax, result):
    """The quartic coupling ``V / (n K^2)`` (input-averaged) against the layer ``l >= 2``, one
    curve per width of the first group: the O(1/n) prediction (lines) and the measured
    kurtosis / 3 at initialization (points)."""
    g = result.groups[0]
    recs = [r for r in result.records_of(g) if r.get("couplings")]
    widths = sorted({r["point"]["width"] for r in recs})
    for i, width in enumerate(widths):
        at = [r for r in recs if r["point"]["width"] == width]
        # layer 1 is exactly Gaussian (its metric is deterministic): from layer 2 on
        pred = np.array([[np.nan if c is None else c for c in r["couplings"]] for r in at])[:, 1:]
        layers = np.arange(2, pred.shape[1] + 2)
        color = f"C{i}"
        ax.plot(layers, np.nanmean(pred, 0), "-", color=color, label=f"n={width}")
        meas = [r["layers"].get("kurtosis") for r in at if r.get("layers")]
        meas = [[np.nan if c is None else c / 3 for c in m[1:]] for m in meas if m]
        if meas:
            ax.plot(layers, np.nanmean(meas, 0), "o", color=color, ms=3)
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer l")
    ax.set_ylabel("coupling V / (n K^2)")
    ax.set_title(
        "quartic coupling by layer: O(1/n) (lines), kurtosis/3 at init (points)", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
