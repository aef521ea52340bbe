"""The two tiers of the suite.

The default run (the README's test command) holds every exactness check and at least one Monte
Carlo check of every statistic on each code path (exact polar integrals, quadrature, closed
forms, the pointwise and distributional kink terms). The slow tier (``pytest -m slow``; CI runs
it after the default run) holds the repeats of those Monte Carlo checks on further activations
and phases, the trained-network Monte Carlo checks across widths that take minutes (the same
recursions, checked again), and the notebooks' execution (a documentation check).
``pytest -m ""`` runs both.

One exception to the rule, for the suite's time: the nonlinear residual MLP's own Monte Carlo
checks across widths (its dNTK on one and on several inputs, its NTK side on several inputs,
tanh and gelu for its kernel side) run in the slow tier only; the default run holds their
exact reductions (a trivial shortcut is the plain engine, a linear activation the exact
residual rules, one input the single-input grid flow) and the Monte Carlo checks of the vertex
and of the several-input kernel side for relu. Likewise the full four-index layout of a
smooth residual MLP (``tests/test_residual_full.py``): the default run checks its cross-layer
moments against the whole set's rule (three inputs, and four for the NTK side) and the whole
layout against the plain engine at ``gamma = 0``; the slow tier holds its other exact checks
(one pair equals the pair layout, a linear activation the exact rules, four inputs for the
kernel side and the ddNTK family), each a compilation of its own.
"""

import pytest


def tiered(names, slow):
    """``names`` as test parameters, those in ``slow`` marked for the slow tier."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]
