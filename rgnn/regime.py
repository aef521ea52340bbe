"""The regime verdict, a razor: ``gaussian``, ``perturbative``, ``non-perturbative`` or
``inconclusive``, with the evidence.

Each measure (:data:`rgnn.study.MEASURES`) is held against what the 1/n theory says of it.
Notation: ``v +- se`` a measure at one width (the seed mean and its standard error), ``t`` its
threshold (:attr:`rgnn.study.Measure.threshold`, or ``tolerance``), ``z = sigmas``.

**Measures with an O(1/n) prediction** ``p +- se_p`` (kurtosis and NTK fluctuation at
initialization from :func:`rgnn.perturbative`; trained-network predictions where a point
carries them, :func:`rgnn.study.run_point`), at every width that has one:

* *non-perturbative* if measurement and prediction part:
  ``|v - p| > z sqrt(se^2 + se_p^2) + a``, with ``a`` the **allowance for the O(1/n^2)
  terms** the prediction neglects: the point's own ``allowance`` if it states one, else
  ``a = max(prediction_rtol, depth/width) |p|``. The O(1/n^2) terms are the O(1/n) ones times
  ``depth/width = sum_l 1/n_l`` times an O(1) constant (PDLT sec. 5.4: depth/width is the
  expansion parameter), taken as 1, and never less than ``prediction_rtol`` (25%) of the
  prediction. (For relu's kurtosis the exact single-input series is
  ``(1 + 5/n)^L - 1``: its O(1/n^2) term is ``2.5 L/n`` times the O(1/n) one, so at
  ``L/n = 1/2`` the allowance covers about 40% of it and the razor cuts where the
  truncated series has stopped describing the networks.)
* otherwise *gaussian* if ``v <= t`` (with ``se <= t``) at the widest width;
* *inconclusive* if at no width the measurement resolves the prediction (``se > |p|``: the
  data cannot tell the predicted effect from none), or if depth/width at the widest width
  exceeds the trust bound (agreement with an expansion that is not trusted there is no
  evidence: for deep and narrow relu networks the moments are heavy-tailed, and a small
  ensemble underestimates them);
* else *perturbative*.

**Trained networks.** Where :func:`rgnn.end_of_training` applies (an MLP in the NTK
parameterization trained by full-batch gd on the mse loss, a smooth activation, few training
inputs: :func:`rgnn.study._end_of_training`), the measured ensemble-mean NTK change
``mean_ntk_movement`` is held against its O(1/n) prediction as above. Where it does not (relu
and leaky relu: their trained departure is not 1/n, measured ~n^-0.5; more training inputs
than :data:`rgnn.study.END_OF_TRAINING_MAX_INPUTS`; ...), :attr:`Regime.trained_prediction`
says why, in the printout and ``regime.json``.

**Measures without a prediction** (the trained networks' distances), at the widest
width, with ``q exponent +- se_p`` the fitted exponent against width, ``[e_fast, e]`` the
exponents perturbation theory allows (``[-1, -1]`` for an ensemble mean, ``[-1, -1/2]`` for a
single network's measure: an O(1/n) mean shift plus an O(1/sqrt(n)) fluctuation) and
``v_inf +- se_inf`` the extrapolation ``v = v_inf + b n^e``:

* *gaussian* if ``v <= t`` (and ``se <= t``);
* *non-perturbative* if ``v - z se > strong``: an order-one deviation is not a small
  correction;
* *inconclusive* at a single width (nothing to hold it against), when the fit failed, when
  its exponent is too noisy to place (``se_p > max_exponent_se``, the width of the allowed
  window ``[-1, -1/2]``), or when it extrapolates significantly below zero
  (``v_inf + z se_inf < 0`` for a nonnegative measure: these widths are not in the 1/n
  regime, or its errors are underestimated);
* *non-perturbative* if it does not fall with width or falls significantly more slowly than
  the slowest perturbative rate (``p - q se_p - exponent_tolerance > e``), or extrapolates
  above the threshold (``v_inf - z se_inf > t``: it converges to something other than the
  fixed point, as feature learning does); a fall faster than ``n^{e_fast}`` still ends at the
  fixed point and is not held against it;
* *inconclusive* beyond the trust bound (as above);
* else *perturbative*.

Any measure is *inconclusive* without a finite standard error (one network per point) or with
``se`` larger than its threshold when it would otherwise be gaussian.

**The label**: *non-perturbative* if any measure is; else *inconclusive* if any measure is,
or if ``depth/width`` at the widest width exceeds the trust bound
(:data:`rgnn.perturbative.TRUST_DEPTH_OVER_WIDTH`, PDLT sec. 5.4: the O(1/n) theory is not
trusted there, so agreement with it is no evidence); else *gaussian* if every measure is;
else *perturbative*. The reasons name the predictions that hold and those that do not.

Thresholds are relative (dimensionless) deviations; the defaults (:data:`rgnn.study.MEASURES`)
say "the fixed point describes the network to 5%".
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from rgnn.perturbative import TRUST_DEPTH_OVER_WIDTH
from rgnn.study import GROUP_FIELDS, MEASURES, Sweep, load_sweep

__all__ = ["Evidence", "Regime", "classify", "LABELS"]

LABELS = ("gaussian", "perturbative", "non-perturbative", "inconclusive")

SIGMAS = 4.0
"""Standard errors allowed before a measured and a predicted value disagree (as the test
suite's Monte Carlo rule)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Evidence:
    """One measure's evidence.

    Attributes:
      value, se: the measure at the widest width (mean over seeds) and its standard error
        (``nan`` without one).
      threshold: the tolerance it is held to.
      exponent, exponent_se: fitted exponent against width (``nan`` at one width).
      expected, fastest: the range of exponents perturbation theory allows (``expected`` the
        slowest, ``fastest`` the fastest; equal for an O(1/n) mean).
      infinite_width, infinite_width_se: extrapolation to infinite width (``nan`` at one
        width).
      predicted: the O(1/n) prediction at the widest width (``nan`` if none).
      predicted_se: its own uncertainty (``0`` if none stated, ``nan`` without a prediction).
      allowance: the allowance for O(1/n^2) terms at the widest width (``nan`` without a
        prediction).
      measure: the measure's name (static).
      verdict: ``gaussian``, ``perturbative``, ``non-perturbative`` or ``inconclusive``
        (static).
      prediction: ``"holds"``, ``"fails"``, ``"unresolved"`` (the data cannot tell) or ``""``
        (no prediction) (static).
      reason: why, in words (static).
    """

    value: float
    se: float
    threshold: float
    exponent: float
    exponent_se: float
    expected: float
    fastest: float
    infinite_width: float
    infinite_width_se: float
    predicted: float
    predicted_se: float = float("nan")
    allowance: float = float("nan")
    measure: str = dataclasses.field(default="", metadata=dict(static=True))
    verdict: str = dataclasses.field(default="", metadata=dict(static=True))
    prediction: str = dataclasses.field(default="", metadata=dict(static=True))
    reason: str = dataclasses.field(default="", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Regime:
    """The verdict on one configuration or one group of a sweep.

    Attributes:
      depth_over_width: ``sum_l 1/n_l`` at the widest width.
      trust: the trust bound it is compared with.
      label: one of :data:`LABELS` (static).
      reasons: the decisive reasons, in words (static).
      evidence: one :class:`Evidence` per measure (static tuple of pytrees).
      group: the group's settings, ``((field, value), ...)`` (static).
      widths: the widths the verdict rests on (static).
      trained_prediction: for trained networks, whether the end-of-training O(1/n) prediction
        (:func:`rgnn.end_of_training`) applied to them, and if not, why (e.g. relu's trained
        departure is not 1/n; too many training inputs for its statistics); ``""`` when the
        points do not say (networks at initialization, older sweeps) (static).
    """

    depth_over_width: float
    trust: float
    label: str = dataclasses.field(default="", metadata=dict(static=True))
    reasons: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    evidence: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    group: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    widths: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    trained_prediction: str = dataclasses.field(default="", metadata=dict(static=True))

    def as_dict(self) -> dict:
        """JSON-ready (``nan`` becomes ``None``)."""

        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return dict(
            label=self.label,
            reasons=list(self.reasons),
            group=dict(self.group),
            widths=list(self.widths),
            depth_over_width=self.depth_over_width,
            trust=self.trust,
            trained_prediction=self.trained_prediction,
            evidence=[
                {f.name: clean(getattr(e, f.name)) for f in dataclasses.fields(e)}
                for e in self.evidence
            ],
        )

    def __str__(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.group)
        lines = [
            f"regime: {self.label.upper()}" + (f"  ({head})" if head else ""),
            f"  widths {list(self.widths)}; depth/width = {self.depth_over_width:.3g} at the "
            f"widest (trusted up to {self.trust:g})",
        ]
        fmt = "  {:<17} {:>9} {:>8} {:>10} {:>9} {:>9} {:>13} {:>8} {:>17}  {}"
        cols = ("measure", "value", "+- se", "O(1/n)", "allowed", "threshold", "exponent")
        lines.append(fmt.format(*cols, "perturb.", "v(inf) +- se", "verdict"))

        def num(v, spec):
            return "-" if math.isnan(v) else format(v, spec)

        for e in self.evidence:
            exp = "-" if math.isnan(e.exponent) else f"{e.exponent:.2f}+-{e.exponent_se:.2f}"
            inf = (
                "-"
                if math.isnan(e.infinite_width)
                else f"{e.infinite_width:.3g}+-{e.infinite_width_se:.2g}"
            )
            allowed = (
                f"{e.fastest:g}" if e.fastest == e.expected else f"{e.fastest:g}..{e.expected:g}"
            )
            lines.append(
                fmt.format(
                    e.measure,
                    f"{e.value:.4g}",
                    num(e.se, ".2g"),
                    num(e.predicted, ".4g"),
                    num(e.allowance, ".2g"),
                    f"{e.threshold:.3g}",
                    exp,
                    allowed,
                    inf,
                    e.verdict,
                )
            )
        told = [e for e in self.evidence if e.prediction]
        if told:
            lines.append(
                "  O(1/n) predictions: "
                + "; ".join(f"{e.measure} {_PREDICTION_WORDS[e.prediction]}" for e in told)
            )
        if self.trained_prediction:
            lines.append(f"  end-of-training O(1/n) prediction: {self.trained_prediction}")
        lines.append("  why:")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


_PREDICTION_WORDS = dict(holds="holds", fails="FAILS", unresolved="not resolved by the data")


def _nan(v):
    return float("nan") if v is None else float(v)


def _bad(v):
    return v is None or not math.isfinite(v)


def _judge(name, rows, fit, *, threshold, sigmas, q, kw):
    """One measure's :class:`Evidence` from its per-width ``rows`` (dicts with ``width``,
    ``value``, ``se``, ``predicted``, ``predicted_se``, ``allowance``, ``depth_over_width``;
    ascending width) and its scaling ``fit`` (or ``None``)."""
    meta = MEASURES.get(name)
    expected = fit.expected if fit is not None else (meta.expected_exponent if meta else -1.0)
    fastest = min(meta.fastest_exponent if meta else -1.0, expected)
    top = rows[-1]
    value, se = top["value"], _nan(top["se"])
    checks = []  # (row, gap, tolerance, allowance) at each width with a prediction
    for r in rows:
        p = r["predicted"]
        if p is None or not math.isfinite(p):
            continue
        p_se = 0.0 if _bad(r.get("predicted_se")) else r["predicted_se"]
        a = r.get("allowance")
        if _bad(a):
            a = max(kw["prediction_rtol"], r["depth_over_width"]) * abs(p)
        s_r = _nan(r["se"])
        tol = sigmas * math.hypot(s_r, p_se) + a
        checks.append((r, abs(r["value"] - p), tol, a, s_r))
    last = checks[-1] if checks else None
    ev = dict(
        value=value,
        se=se,
        threshold=threshold,
        exponent=fit.exponent if fit is not None else float("nan"),
        exponent_se=fit.exponent_se if fit is not None else float("nan"),
        expected=expected,
        fastest=fastest,
        infinite_width=fit.infinite_width if fit is not None else float("nan"),
        infinite_width_se=fit.infinite_width_se if fit is not None else float("nan"),
        predicted=_nan(top["predicted"]) if checks else float("nan"),
        predicted_se=(
            (0.0 if _bad(top.get("predicted_se")) else top["predicted_se"])
            if checks
            else float("nan")
        ),
        allowance=last[3] if last is not None and last[0] is top else float("nan"),
        measure=name,
    )
    told = "holds" if checks else ""

    def out(verdict, reason, prediction=None):
        return Evidence(
            **ev,
            verdict=verdict,
            reason=reason,
            prediction=told if prediction is None else prediction,
        )

    if math.isnan(se) or any(math.isnan(c[4]) for c in checks):
        return out(
            "inconclusive",
            "no standard error (one network per point?): nothing can be held against it",
            "unresolved" if checks else "",
        )
    if checks:
        parted = [c for c in checks if c[1] > c[2]]
        if parted:
            r, gap, tol, a, s_r = max(parted, key=lambda c: c[1] / c[2])
            return out(
                "non-perturbative",
                f"measured {r['value']:.4g} +- {s_r:.2g} parts from the O(1/n) prediction "
                f"{r['predicted']:.4g} at width {r['width']} (|difference| {gap:.3g} > "
                f"{sigmas:g} se + allowance {a:.2g} for O(1/n^2) = {tol:.3g})",
                "fails",
            )
        if value <= threshold and se <= threshold:
            return out("gaussian", f"{value:.4g} <= threshold {threshold:g}; {_agree(checks)}")
        if not any(c[4] <= abs(c[0]["predicted"]) for c in checks):
            return out(
                "inconclusive",
                f"agrees with its O(1/n) prediction only because its standard error "
                f"({se:.2g} at width {top['width']}) is as large as the predicted effect "
                f"({abs(_nan(top['predicted'])):.2g}): more networks would tell",
                "unresolved",
            )
        if top["depth_over_width"] > TRUST_DEPTH_OVER_WIDTH:
            return out(
                "inconclusive",
                f"{_agree(checks)}, but at depth/width {top['depth_over_width']:.3g} > "
                f"{TRUST_DEPTH_OVER_WIDTH:g} agreement with an untrusted expansion is no "
                "evidence (heavy tails hide in small ensembles)",
                "unresolved",
            )
        return out("perturbative", _agree(checks))
    # no prediction: the threshold, the size and the scaling with width
    if value <= threshold:
        if se > threshold:
            return out(
                "inconclusive",
                f"{value:.4g} <= threshold {threshold:g}, but its standard error {se:.2g} "
                "exceeds the threshold",
            )
        return out("gaussian", f"{value:.4g} <= threshold {threshold:g}")
    strong = kw["strong"]
    if value - sigmas * se > strong:
        return out(
            "non-perturbative",
            f"{value:.4g} +- {se:.2g} > {strong:g}: an order-one deviation is not a small "
            "correction",
        )
    if fit is None:
        return out(
            "inconclusive",
            f"{threshold:g} < {value:.4g} at one width with no O(1/n) prediction: nothing to "
            "hold it against (a sweep over widths would test its exponent)",
        )
    p, p_se = fit.exponent, fit.exponent_se
    v_inf, v_inf_se = fit.infinite_width, fit.infinite_width_se
    if math.isnan(p) or math.isnan(v_inf) or math.isnan(p_se) or math.isnan(v_inf_se):
        return out("inconclusive", "the fit against width failed (non-positive values?)")
    if v_inf + sigmas * v_inf_se < 0:
        return out(
            "inconclusive",
            f"extrapolates to {v_inf:.3g} +- {v_inf_se:.2g}, significantly below zero for a "
            "nonnegative measure: these widths are not in the 1/n regime, or the errors are "
            "underestimated",
        )
    failed = []
    slack = q * p_se + kw["exponent_tolerance"]
    if p - slack > expected:  # significantly slower than the slowest perturbative rate
        what = "does not fall with width" if p + q * p_se >= 0 else "falls too slowly"
        failed.append(
            f"{what}: exponent {p:.2f} +- {p_se:.2f}, slower than the slowest perturbative "
            f"rate n^{expected:g} by more than {q:.2g} se + {kw['exponent_tolerance']:g}"
        )
    if v_inf - sigmas * v_inf_se > threshold:
        failed.append(
            f"extrapolates to {v_inf:.3g} +- {v_inf_se:.2g} > threshold {threshold:g} at "
            "infinite width"
        )
    if failed:
        return out("non-perturbative", "; ".join(failed))
    if p_se > kw["max_exponent_se"]:
        return out(
            "inconclusive",
            f"exponent {p:.2f} +- {p_se:.2f} too noisy to place (se > {kw['max_exponent_se']:g})",
        )
    if top["depth_over_width"] > TRUST_DEPTH_OVER_WIDTH:
        return out(
            "inconclusive",
            f"falls as n^{p:.2f} +- {p_se:.2f}, but at depth/width "
            f"{top['depth_over_width']:.3g} > {TRUST_DEPTH_OVER_WIDTH:g} the 1/n expansion is "
            "not trusted",
        )
    return out(
        "perturbative",
        f"{value:.4g} > {threshold:g} but falls as n^{p:.2f} +- {p_se:.2f} (expected "
        f"{_rate(fastest, expected)}) towards {v_inf:.3g} +- {v_inf_se:.2g}",
    )


def _agree(checks):
    r, gap, tol, a, s_r = checks[-1]
    widths = ", ".join(str(c[0]["width"]) for c in checks)
    return (
        f"agrees with its O(1/n) prediction at width(s) {widths} (widest: {r['value']:.4g} +- "
        f"{s_r:.2g} vs {r['predicted']:.4g}, |difference| {gap:.3g} <= {tol:.3g})"
    )


def _rate(fastest, slowest):
    return f"n^{slowest:g}" if fastest == slowest else f"n^{fastest:g} to n^{slowest:g}"


def _trained_prediction(records) -> str:
    """What the points say about the end-of-training prediction (their ``end_of_training``
    entries, :func:`rgnn.study._end_of_training`), in one line."""
    said = [r["end_of_training"] for r in records if r.get("end_of_training")]
    if not said:
        return ""
    if all(s["applies"] for s in said):
        return "applies: the trained measures with an O(1/n) column are held against it"
    reasons = list(dict.fromkeys(s["reason"] for s in said if not s["applies"]))
    some = "" if not any(s["applies"] for s in said) else " at some points"
    return (
        f"none{some}: " + "; ".join(reasons) + " (the trained measures are judged by their "
        "size and scaling with width only)"
    )


def _verdict(evidence, depth_over_width, trust, group, widths, trained="") -> Regime:
    reasons = []
    untrusted = depth_over_width > trust
    if untrusted:
        reasons.append(
            f"depth/width = {depth_over_width:.3g} > {trust:g}: the O(1/n) expansion is not "
            "trusted here (PDLT sec. 5.4)"
        )
    bad = [e for e in evidence if e.verdict == "non-perturbative"]
    unsure = [e for e in evidence if e.verdict == "inconclusive"]
    if bad:
        label = "non-perturbative"
        reasons += [f"{e.measure}: {e.reason}" for e in bad]
    elif unsure or untrusted:
        label = "inconclusive"
        reasons += [f"{e.measure}: {e.reason}" for e in unsure]
        if untrusted and not unsure:
            reasons.append(
                "no measure departs from the fixed point or its prediction, but "
                "agreement with an untrusted expansion is no evidence"
            )
    elif all(e.verdict == "gaussian" for e in evidence):
        label = "gaussian"
        reasons.append("every measure is within its threshold of the Gaussian fixed point")
    else:
        label = "perturbative"
        reasons += [f"{e.measure}: {e.reason}" for e in evidence if e.verdict == "perturbative"]
    return Regime(
        depth_over_width=float(depth_over_width),
        trust=float(trust),
        label=label,
        reasons=tuple(reasons),
        evidence=tuple(evidence),
        group=tuple(group),
        widths=tuple(widths),
        trained_prediction=trained,
    )


def _quantile_of(fit):
    if fit is not None and fit.exponent_se > 0:
        return (fit.exponent_high - fit.exponent) / fit.exponent_se  # the fit's own quantile
    return float("nan")


def _classify_group(result: Sweep, group: dict, **kw) -> Regime:
    recs = result.records_of(group)
    widths = sorted({r["point"]["width"] for r in recs})
    widest = [r for r in recs if r["point"]["width"] == widths[-1]]
    fits = result.fits_of(group)
    table = [r for r in result.table() if all(r[f] == group[f] for f in GROUP_FIELDS)]
    evidence = []
    for name in result.measures:
        rows = [
            dict(
                width=r["width"],
                value=float(r[name]),
                se=r.get(name + "_se"),
                predicted=r.get(name + "_predicted"),
                predicted_se=r.get(name + "_predicted_se"),
                allowance=r.get(name + "_allowance"),
                depth_over_width=r["depth_over_width"],
            )
            for r in table
            if name in r
        ]
        if not rows or rows[-1]["width"] != widths[-1]:
            continue
        fit = fits.get(name)
        evidence.append(
            _judge(
                name,
                rows,
                fit,
                threshold=_threshold(name, kw["tolerance"]),
                sigmas=kw["sigmas"],
                q=_quantile_of(fit),
                kw=kw,
            )
        )
    dow = float(np.mean([r["depth_over_width"] for r in widest]))
    group_t = tuple((f, group[f]) for f in GROUP_FIELDS)
    return _verdict(
        evidence, dow, TRUST_DEPTH_OVER_WIDTH, group_t, widths, _trained_prediction(recs)
    )


def _threshold(name, tolerance):
    if tolerance is not None:
        return float(tolerance)
    return MEASURES[name].threshold if name in MEASURES else 0.05


def _classify_point(record: dict, **kw) -> Regime:
    evidence = []
    p = record["point"]
    for name, m in record["measures"].items():
        if m.get("value") is None:
            continue
        row = dict(
            width=p["width"],
            value=float(m["value"]),
            se=m.get("se"),
            predicted=m.get("predicted"),
            predicted_se=m.get("predicted_se"),
            allowance=m.get("allowance"),
            depth_over_width=record["depth_over_width"],
        )
        evidence.append(
            _judge(
                name,
                [row],
                None,
                threshold=_threshold(name, kw["tolerance"]),
                sigmas=kw["sigmas"],
                q=float("nan"),
                kw=kw,
            )
        )
    group_t = tuple((f, p[f]) for f in GROUP_FIELDS if f in p)
    return _verdict(
        evidence,
        record["depth_over_width"],
        TRUST_DEPTH_OVER_WIDTH,
        group_t,
        (p["width"],),
        _trained_prediction([record]),
    )


def classify(
    result,
    x=None,
    y=None,
    *,
    group: dict | None = None,
    tolerance: float | None = None,
    sigmas: float = SIGMAS,
    exponent_tolerance: float = 0.25,
    prediction_rtol: float = 0.25,
    strong: float = 0.5,
    max_exponent_se: float = 0.5,
    seed: int = 0,
    **settings,
) -> Regime:
    """Label a configuration or a sweep ``gaussian``, ``perturbative``, ``non-perturbative``
    or ``inconclusive``: each measure held against its O(1/n) prediction where it has one.

    Args:
      result: a :class:`~rgnn.study.Sweep`, a sweep's results directory (``str`` or
        ``Path``), one point's record (a ``dict`` from ``Sweep.records``), or an
        :class:`~rgnn.MLP` (or a stax triple, flax module or :class:`rgnn.models.Model`,
        :func:`rgnn.models.as_model`), which is then trained on ``(x, y)`` and compared as one
        sweep point (:func:`rgnn.study.run_point` with ``seed`` and ``settings``: ``steps``,
        ``learning_rate``, ``optimizer``, ``loss``, ``n_networks``, ``predict``).
      group: for a sweep with several groups (depths, activations, ...), which one, as a dict
        of :data:`rgnn.study.GROUP_FIELDS` values (``Sweep.groups`` lists them).
      tolerance: one threshold for every measure instead of each measure's own.
      sigmas: standard errors allowed between a measurement and its prediction.
      exponent_tolerance: slack between a fitted exponent and the expected one, beyond its
        confidence interval (pre-asymptotic curvature at small widths).
      prediction_rtol: the smallest allowance for the O(1/n^2) terms, relative to the
        prediction (the allowance is ``max(prediction_rtol, depth/width) |prediction|``
        unless a point states its own).
      strong: a measure without a prediction above this (by ``sigmas`` standard errors) is an
        order-one deviation: non-perturbative.
      max_exponent_se: a fitted exponent noisier than this cannot be placed in the
        perturbative window: inconclusive.

    Returns:
      A :class:`Regime`; ``print`` it for the evidence. The criteria are in the module
      docstring.
    """
    from rgnn.architecture import MLP

    kw = dict(
        tolerance=tolerance,
        sigmas=float(sigmas),
        exponent_tolerance=float(exponent_tolerance),
        prediction_rtol=float(prediction_rtol),
        strong=float(strong),
        max_exponent_se=float(max_exponent_se),
    )
    if tolerance is not None and not float(tolerance) > 0:
        raise ValueError(f"tolerance: expected a positive number, got {tolerance!r}")
    if isinstance(result, str | Path):
        result = load_sweep(result)
    from rgnn.models import as_model, is_model_like

    if is_model_like(result):  # a stax triple, a flax module or a model: one point, as an MLP
        result = as_model(result)
    if isinstance(result, MLP) or is_model_like(result):
        from rgnn.study import _depth_over_width, run_point

        if x is None or y is None:
            raise ValueError("x, y: expected inputs and targets to train the architecture on")
        defaults = dict(
            steps=100, learning_rate=0.1, optimizer="gd", loss="mse", n_networks=8, predict=True
        )
        unknown = set(settings) - set(defaults)
        if unknown:
            raise ValueError(f"settings: unknown {sorted(unknown)}; expected {sorted(defaults)}")
        defaults.update(settings)
        out = run_point(result, x, y, seed=seed, settings=defaults)
        mlp = isinstance(result, MLP)
        record = dict(
            out,
            point=dict(
                depth=result.depth,
                width=max(result.widths) if mlp else result.width,
                activation=result.act.name if mlp else result.activation,
                parameterization=result.parameterization,
                learning_rate=defaults["learning_rate"],
                seed=seed,
            ),
            depth_over_width=_depth_over_width(result),
        )
        return _classify_point(record, **kw)
    if settings:
        raise ValueError(f"settings: only used with an MLP to train, got {sorted(settings)}")
    if isinstance(result, dict):
        return _classify_point(result, **kw)
    if not isinstance(result, Sweep):
        raise ValueError(
            "result: expected an rgnn Sweep, a sweep directory, a point record or an rgnn.MLP, "
            f"got {type(result).__name__}"
        )
    groups = result.groups
    if not groups:
        raise ValueError("result: the sweep has no finished points")
    if group is None:
        if len(groups) > 1:
            raise ValueError(
                f"group: the sweep has {len(groups)} groups; pass one of {list(groups)}"
            )
        group = groups[0]
    match = [g for g in groups if all(g.get(k) == v for k, v in group.items())]
    if len(match) != 1:
        raise ValueError(f"group: expected one of {list(groups)}, got {group!r}")
    return _classify_group(result, match[0], **kw)
