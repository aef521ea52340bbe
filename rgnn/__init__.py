"""rgnn: the renormalization-group view of neural networks, in JAX.

The Gaussian fixed point (infinite-width NNGP/NTK, layer by layer), the perturbative 1/width
flow, and finite networks measured against both.
"""

from rgnn import data, sharding
from rgnn._compat import import_neural_tangents
from rgnn.activations import KNOWN_ACTIVATIONS, Activation, get_activation, leaky_relu
from rgnn.architecture import MLP, MLPNetwork
from rgnn.criticality import UNIVERSALITY_CLASSES, Criticality, critical_point, criticality
from rgnn.empirical import Measurement, empirical_nngp, empirical_ntk, measure
from rgnn.fixed_point import FixedPoint, fixed_point
from rgnn.networks import Ensemble, ensemble
from rgnn.perturbative import Perturbative, perturbative
from rgnn.regime import Regime, classify
from rgnn.sweep import ScalingFit, Sweep, sweep

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Criticality",
    "data",
    "Ensemble",
    "FixedPoint",
    "KNOWN_ACTIVATIONS",
    "MLP",
    "MLPNetwork",
    "Measurement",
    "Perturbative",
    "Regime",
    "ScalingFit",
    "Sweep",
    "UNIVERSALITY_CLASSES",
    "classify",
    "critical_point",
    "criticality",
    "empirical_nngp",
    "empirical_ntk",
    "ensemble",
    "fixed_point",
    "get_activation",
    "import_neural_tangents",
    "leaky_relu",
    "measure",
    "perturbative",
    "sharding",
    "sweep",
]
