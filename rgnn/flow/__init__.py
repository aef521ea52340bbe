"""The flow engine: every statistic of the perturbative flow, on any set of inputs.

* :mod:`rgnn.flow.tensor`: labelled tensors, so recursions read like their index formulas;
* :mod:`rgnn.flow.moments`: one Gaussian-moment engine (quadrature, exact polar integrals and
  kink terms for the scale-invariant class, three/four-input tables);
* :mod:`rgnn.flow.rules`: each statistic's update, written once;
* :mod:`rgnn.flow.engine`: one ``lax.scan`` over layers carrying the requested statistics.
"""
