"""The regime verdict: ``gaussian``, ``perturbative`` or ``non-perturbative``, with the evidence.

Criteria (``v``: a measure at the widest width, the seed mean, with standard error ``se``;
``t``: its threshold, :attr:`rgnn.study.Measure.threshold` unless ``tolerance`` overrides it;
``p +- se_p``: its fitted exponent against width, ``q`` the 95% quantile of its interval;
``[e_fast, e]``: the exponents perturbation theory allows, ``[-1, -1]`` for an O(1/n) mean effect
and ``[-1, -1/2]`` for a single network's measure, which is an O(1/n) mean shift plus an
O(1/sqrt(n)) fluctuation (:class:`rgnn.study.Measure`); ``v_inf +- se_inf``: the extrapolation
to infinite width, ``v = v_inf + b n^e``; ``z``: ``sigmas``):

1. **Trust** (PDLT sec. 5.4, :data:`rgnn.perturbative.TRUST_DEPTH_OVER_WIDTH`). If
   ``depth/width = sum_l 1/n_l`` at the widest width exceeds the trust bound, the O(1/n)
   expansion does not describe the network: **non-perturbative**, whatever the measures say.
2. Each measure gets a verdict:

   * *gaussian* if ``v <= t``: the fixed point describes it within the tolerance;
   * with a perturbative prediction (kurtosis, kernel variance): *non-perturbative* if the
     measurement and the prediction disagree, ``|v - v_pred| > z se + prediction_rtol |v_pred|``
     (the relative slack covers the neglected O(1/n^2) terms, which are ``depth/width`` times
     the O(1/n) ones times an O(1) constant);
   * with a sweep (two or more widths), for ``v > t``: *non-perturbative* if it does not fall
     with width, or falls significantly more slowly than the slowest perturbative rate
     (``p - q se_p - exponent_tolerance > e``), or its infinite-width extrapolation stays above
     the threshold (``v_inf - z se_inf > t``: the network converges to something other than
     the fixed point, as feature learning does); otherwise *perturbative*. A fall faster than
     ``n^{e_fast}`` still ends at the fixed point (a vanishing O(1/n) coefficient), so it is
     not held against the measure; a noisy exponent that cannot be told from the allowed range
     is not either (the verdict then rests on the values and the extrapolation);
   * at a single width, for ``v > t``: *non-perturbative* if ``v > strong`` (a relative
     deviation of order one is not a small correction), otherwise *perturbative*.
3. The label: **non-perturbative** if the trust bound fails or any measure is non-perturbative;
   else **gaussian** if every measure is gaussian; else **perturbative**.

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

LABELS = ("gaussian", "perturbative", "non-perturbative")

SIGMAS = 4.0
"""Standard errors allowed before a measured and a predicted value disagree (as the test
suite's Monte Carlo rule)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Evidence:
    """One measure's evidence.

    Attributes:
      value, se: the measure at the widest width (mean over seeds) and its standard error.
      threshold: the tolerance it is held to.
      exponent, exponent_se: fitted exponent against width (``nan`` at one width).
      expected, fastest: the range of exponents perturbation theory allows (``expected`` the
        slowest, ``fastest`` the fastest; equal for an O(1/n) mean).
      infinite_width, infinite_width_se: extrapolation to infinite width (``nan`` at one
        width).
      predicted: the perturbative prediction at the widest width (``nan`` if none).
      measure: the measure's name (static).
      verdict: ``gaussian``, ``perturbative`` or ``non-perturbative`` (static).
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
    measure: str = dataclasses.field(default="", metadata=dict(static=True))
    verdict: str = dataclasses.field(default="", metadata=dict(static=True))
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
    """

    depth_over_width: float
    trust: float
    label: str = dataclasses.field(default="", metadata=dict(static=True))
    reasons: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    evidence: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    group: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    widths: tuple = dataclasses.field(default=(), metadata=dict(static=True))

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
        fmt = "  {:<15} {:>9} {:>8} {:>10} {:>9} {:>13} {:>8} {:>17}  {}"
        cols = ("measure", "value", "+- se", "predicted", "threshold", "exponent", "allowed")
        lines.append(fmt.format(*cols, "v(inf) +- se", "verdict"))

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
                    f"{e.threshold:.3g}",
                    exp,
                    allowed,
                    inf,
                    e.verdict,
                )
            )
        lines.append("  why:")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _nan(v):
    return float("nan") if v is None else float(v)


def _judge(
    name,
    value,
    se,
    predicted,
    fit,
    *,
    threshold,
    sigmas,
    q,
    exponent_tolerance,
    prediction_rtol,
    strong,
):
    meta = MEASURES.get(name)
    expected = fit.expected if fit is not None else (meta.expected_exponent if meta else -1.0)
    fastest = min(meta.fastest_exponent if meta else -1.0, expected)
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
        predicted=predicted,
        measure=name,
    )
    se0 = 0.0 if math.isnan(se) else se
    if not math.isnan(predicted):
        gap = abs(value - predicted)
        allowed = sigmas * se0 + prediction_rtol * abs(predicted)
        if gap > allowed:
            return Evidence(
                **ev,
                verdict="non-perturbative",
                reason=f"measured {value:.4g} +- {se0:.2g} disagrees with the O(1/n) prediction "
                f"{predicted:.4g} (|difference| {gap:.3g} > {sigmas:g} se + "
                f"{prediction_rtol:g} |prediction| = {allowed:.3g})",
            )
    if value <= threshold:
        return Evidence(**ev, verdict="gaussian", reason=f"{value:.4g} <= threshold {threshold:g}")
    if fit is None or math.isnan(fit.exponent):
        if value > strong:
            return Evidence(
                **ev,
                verdict="non-perturbative",
                reason=f"{value:.4g} > {strong:g}: an order-one deviation is not a small "
                "correction",
            )
        return Evidence(
            **ev,
            verdict="perturbative",
            reason=f"{threshold:g} < {value:.4g} <= {strong:g} at one width (a sweep over widths "
            "would test its exponent)",
        )
    p, p_se = fit.exponent, fit.exponent_se
    v_inf, v_inf_se = fit.infinite_width, fit.infinite_width_se
    failed = []
    slack = q * p_se + exponent_tolerance
    if p - slack > expected:  # significantly slower than the slowest perturbative rate
        what = "does not fall with width" if p + q * p_se >= 0 else "falls too slowly"
        failed.append(
            f"{what}: exponent {p:.2f} +- {p_se:.2f}, slower than the slowest perturbative "
            f"rate n^{expected:g} by more than {q:.2g} se + {exponent_tolerance:g}"
        )
    if v_inf - sigmas * v_inf_se > threshold:
        failed.append(
            f"extrapolates to {v_inf:.3g} +- {v_inf_se:.2g} > threshold {threshold:g} at "
            "infinite width"
        )
    if failed:
        return Evidence(**ev, verdict="non-perturbative", reason="; ".join(failed))
    return Evidence(
        **ev,
        verdict="perturbative",
        reason=f"{value:.4g} > {threshold:g} but falls as n^{p:.2f} +- {p_se:.2f} (expected "
        f"{_rate(fastest, expected)}) towards {v_inf:.3g} +- {v_inf_se:.2g}",
    )


def _rate(fastest, slowest):
    return f"n^{slowest:g}" if fastest == slowest else f"n^{fastest:g} to n^{slowest:g}"


def _verdict(evidence, depth_over_width, trust, group, widths) -> Regime:
    reasons = []
    if depth_over_width > trust:
        reasons.append(
            f"depth/width = {depth_over_width:.3g} > {trust:g}: the O(1/n) expansion is not "
            "trusted here (PDLT sec. 5.4)"
        )
    bad = [e for e in evidence if e.verdict == "non-perturbative"]
    reasons += [f"{e.measure}: {e.reason}" for e in bad]
    if reasons:
        label = "non-perturbative"
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
    )


def _classify_group(result: Sweep, group: dict, **kw) -> Regime:
    recs = result.records_of(group)
    widths = sorted({r["point"]["width"] for r in recs})
    widest = [r for r in recs if r["point"]["width"] == widths[-1]]
    fits = result.fits_of(group)
    rows = {r["width"]: r for r in result.table() if all(r[f] == group[f] for f in GROUP_FIELDS)}
    top = rows[widths[-1]]
    evidence = []
    for name in result.measures:
        if name not in top:
            continue
        fit = fits.get(name)
        q = float("nan")
        if fit is not None and fit.exponent_se > 0:
            q = (fit.exponent_high - fit.exponent) / fit.exponent_se  # the fit's own quantile
        evidence.append(
            _judge(
                name,
                float(top[name]),
                _nan(top.get(name + "_se")),
                _nan(top.get(name + "_predicted")),
                fit,
                threshold=_threshold(name, kw["tolerance"]),
                q=q,
                **{k: v for k, v in kw.items() if k != "tolerance"},
            )
        )
    dow = float(np.mean([r["depth_over_width"] for r in widest]))
    group_t = tuple((f, group[f]) for f in GROUP_FIELDS)
    return _verdict(evidence, dow, TRUST_DEPTH_OVER_WIDTH, group_t, widths)


def _threshold(name, tolerance):
    if tolerance is not None:
        return float(tolerance)
    return MEASURES[name].threshold if name in MEASURES else 0.05


def _classify_point(record: dict, **kw) -> Regime:
    evidence = []
    for name, m in record["measures"].items():
        if m.get("value") is None:
            continue
        evidence.append(
            _judge(
                name,
                float(m["value"]),
                _nan(m.get("se")),
                _nan(m.get("predicted")),
                None,
                threshold=_threshold(name, kw["tolerance"]),
                q=float("nan"),
                **{k: v for k, v in kw.items() if k != "tolerance"},
            )
        )
    p = record["point"]
    group_t = tuple((f, p[f]) for f in GROUP_FIELDS if f in p)
    return _verdict(
        evidence, record["depth_over_width"], TRUST_DEPTH_OVER_WIDTH, group_t, (p["width"],)
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
    seed: int = 0,
    **settings,
) -> Regime:
    """Label a configuration or a sweep ``gaussian``, ``perturbative`` or ``non-perturbative``.

    Args:
      result: a :class:`~rgnn.study.Sweep`, a sweep's results directory (``str`` or
        ``Path``), one point's record (a ``dict`` from ``Sweep.records``), or an
        :class:`~rgnn.MLP`, which is then trained on ``(x, y)`` and compared as one sweep
        point (:func:`rgnn.study.run_point` with ``seed`` and ``settings``: ``steps``,
        ``learning_rate``, ``optimizer``, ``loss``, ``n_networks``, ``predict``).
      group: for a sweep with several groups (depths, activations, ...), which one, as a dict
        of :data:`rgnn.study.GROUP_FIELDS` values (``Sweep.groups`` lists them).
      tolerance: one threshold for every measure instead of each measure's own.
      sigmas: standard errors allowed between a measurement and its prediction.
      exponent_tolerance: slack between a fitted exponent and the expected one, beyond its
        confidence interval (pre-asymptotic curvature at small widths).
      prediction_rtol: relative slack between a measurement and its O(1/n) prediction.
      strong: at a single width, deviations above this are non-perturbative.

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
    )
    if tolerance is not None and not float(tolerance) > 0:
        raise ValueError(f"tolerance: expected a positive number, got {tolerance!r}")
    if isinstance(result, str | Path):
        result = load_sweep(result)
    if isinstance(result, MLP):
        from rgnn.study import run_point

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
        record = dict(
            out,
            point=dict(
                depth=result.depth,
                width=max(result.widths),
                activation=result.act.name,
                parameterization=result.parameterization,
                learning_rate=defaults["learning_rate"],
                seed=seed,
            ),
            depth_over_width=float(np.sum(1.0 / np.asarray(result.widths, float))),
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
