"""rgnn: the renormalization-group view of neural networks, in JAX.

The Gaussian fixed point (infinite-width NNGP/NTK, layer by layer), the perturbative 1/width
flow, and finite networks measured against both.
"""

from rgnn import data
from rgnn._compat import import_neural_tangents
from rgnn.activations import Activation
from rgnn.activations import KNOWN_ACTIVATIONS
from rgnn.activations import get_activation
from rgnn.activations import leaky_relu
from rgnn.architecture import MLP
from rgnn.architecture import MLPNetwork
from rgnn.criticality import UNIVERSALITY_CLASSES
from rgnn.criticality import Criticality
from rgnn.criticality import critical_point
from rgnn.criticality import criticality
from rgnn.empirical import empirical_nngp
from rgnn.empirical import Measurement
from rgnn.empirical import empirical_ntk
from rgnn.empirical import measure
from rgnn.fixed_point import FixedPoint
from rgnn.fixed_point import fixed_point
from rgnn.networks import Ensemble
from rgnn.networks import ensemble
from rgnn.perturbative import Perturbative
from rgnn.perturbative import perturbative

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
    "UNIVERSALITY_CLASSES",
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
]
