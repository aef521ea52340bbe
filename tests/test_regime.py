"""The regime verdict: each criterion on synthetic sweeps with a known answer, then on trained
networks with a known answer (wide NTK nets with a small learning rate, deep narrow nets at
initialization, muP nets learning features)."""

import math

import numpy as np
import pytest

import rgnn
from rgnn.regime import LABELS

WIDTHS = [32, 64, 128, 256]


def _synthetic(**forms):
    """A point function whose measure ``name`` is ``forms[name](n)`` with 3% seeded noise and a
    3% standard error; ``name + "_predicted"`` forms give a prediction."""

    def point(arch, x, y, *, seed, settings):
        rng = np.random.RandomState(seed * 7919 + arch.width)
        measures = {}
        for name, f in forms.items():
            if name.endswith("_predicted"):
                continue
            v = f(arch.width) * (1 + 0.03 * rng.randn())
            pred = forms.get(name + "_predicted")
            measures[name] = dict(
                value=v, se=0.03 * abs(v), predicted=None if pred is None else pred(arch.width)
            )
        return dict(measures=measures)

    return point


def _sweep(depth=1, **forms):
    x, labels = rgnn.data.digits(8)
    y = np.where(labels % 2 == 0, 1.0, -1.0)
    arch = rgnn.MLP(depth, 8)
    return rgnn.sweep(arch, x, y, widths=WIDTHS, seeds=[0, 1, 2], point=_synthetic(**forms))


def _verdicts(regime):
    return {e.measure: e.verdict for e in regime.evidence}


def test_each_criterion_on_synthetic_sweeps():
    regime = rgnn.classify(_sweep(small=lambda n: 1.0 / n))
    assert regime.label == "gaussian"
    # above the 5% threshold but falling like 1/n to zero
    regime = rgnn.classify(_sweep(small=lambda n: 1.0 / n, falling=lambda n: 40.0 / n))
    assert regime.label == "perturbative" and _verdicts(regime)["falling"] == "perturbative"
    # flat: does not fall with width
    regime = rgnn.classify(_sweep(falling=lambda n: 40.0 / n, flat=lambda n: 0.4))
    assert regime.label == "non-perturbative"
    assert _verdicts(regime) == dict(falling="perturbative", flat="non-perturbative")
    assert "does not fall with width" in regime.reasons[0]
    # falls, but towards 0.3, not towards the fixed point
    regime = rgnn.classify(_sweep(offset=lambda n: 0.3 + 20.0 / n))
    assert regime.label == "non-perturbative" and "extrapolates to" in regime.reasons[0]
    # falls, but as n^-0.3, not the expected n^-1
    regime = rgnn.classify(_sweep(slow=lambda n: 2.0 * n**-0.3))
    assert regime.label == "non-perturbative" and "not as the expected n^-1" in regime.reasons[0]
    ev = regime.evidence[0]
    assert abs(ev.exponent + 0.3) < 4 * ev.exponent_se and ev.expected == -1.0


def test_prediction_and_trust_criteria():
    # a measured fluctuation that agrees with its O(1/n) prediction, and one that is 2x it
    agree = dict(kurt=lambda n: 20.0 / n, kurt_predicted=lambda n: 20.0 / n)
    assert rgnn.classify(_sweep(**agree)).label == "perturbative"
    regime = rgnn.classify(_sweep(kurt=lambda n: 40.0 / n, kurt_predicted=lambda n: 20.0 / n))
    assert (
        regime.label == "non-perturbative"
        and "disagrees with the O(1/n) prediction" in (regime.reasons[0])
    )
    # depth/width = 40/256 > 0.25 at the widest width: not trusted, whatever the measures say
    regime = rgnn.classify(_sweep(depth=80, small=lambda n: 1.0 / n))
    assert regime.label == "non-perturbative" and regime.depth_over_width == 80 / 256
    assert "not trusted" in regime.reasons[0]


def test_single_point_and_printout():
    result = _sweep(small=lambda n: 1.0 / n, mid=lambda n: 0.2, big=lambda n: 0.9)
    record = result.records[-1]  # width 256
    regime = rgnn.classify(record)
    assert regime.widths == (256,) and regime.label == "non-perturbative"
    assert _verdicts(regime) == dict(small="gaussian", mid="perturbative", big="non-perturbative")
    assert all(math.isnan(e.exponent) for e in regime.evidence)
    text = str(regime)
    assert text.startswith("regime: NON-PERTURBATIVE")
    for word in ("measure", "threshold", "exponent", "small", "mid", "big", "0.05"):
        assert word in text
    d = regime.as_dict()
    assert d["label"] in LABELS and d["evidence"][0]["exponent"] is None


def test_classify_bad_input():
    result = _sweep(small=lambda n: 1.0 / n)
    with pytest.raises(ValueError, match="result: expected an rgnn Sweep"):
        rgnn.classify(42)
    with pytest.raises(ValueError, match="group: expected one of"):
        rgnn.classify(result, group=dict(depth=7))
    with pytest.raises(ValueError, match="tolerance: expected a positive number"):
        rgnn.classify(result, tolerance=0)
    with pytest.raises(ValueError, match="x, y: expected inputs and targets"):
        rgnn.classify(rgnn.MLP(1, 8))
