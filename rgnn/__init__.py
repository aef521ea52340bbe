"""rgnn: the renormalization-group view of neural networks, in JAX.

The Gaussian fixed point (infinite-width NNGP/NTK, layer by layer), the perturbative 1/width
flow, and finite networks measured against both.
"""

from rgnn import data, models, sharding
from rgnn._compat import import_neural_tangents
from rgnn.activations import KNOWN_ACTIVATIONS, Activation, get_activation, leaky_relu
from rgnn.architecture import MLP, MLPNetwork
from rgnn.compare import Comparison, cka, compare, gaussian_reference, linearized_prediction
from rgnn.criticality import UNIVERSALITY_CLASSES, Criticality, critical_point, criticality
from rgnn.empirical import Measurement, empirical_nngp, empirical_ntk, measure
from rgnn.fixed_point import FixedPoint, fixed_point
from rgnn.networks import Ensemble, ensemble
from rgnn.perturbative import FourPoint, Perturbative, perturbative, vertex
from rgnn.regime import Regime, classify
from rgnn.study import ScalingFit, Sweep, sweep
from rgnn.training import Training, batch_indices, ensemble_kernels, train
from rgnn.training_theory import EndOfTraining, end_of_training
from rgnn.wilsonian import (
    ScaleResolved,
    Wilsonian,
    rbf_kernel,
    rbf_running_ridge,
    rbf_spectrum,
    scale_resolved,
    wilsonian,
    wilsonian_fixed_point,
)

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Comparison",
    "Criticality",
    "data",
    "EndOfTraining",
    "Ensemble",
    "FixedPoint",
    "FourPoint",
    "KNOWN_ACTIVATIONS",
    "MLP",
    "MLPNetwork",
    "Measurement",
    "Perturbative",
    "Regime",
    "ScaleResolved",
    "ScalingFit",
    "Sweep",
    "Training",
    "UNIVERSALITY_CLASSES",
    "Wilsonian",
    "batch_indices",
    "cka",
    "classify",
    "compare",
    "critical_point",
    "criticality",
    "empirical_nngp",
    "empirical_ntk",
    "end_of_training",
    "ensemble",
    "ensemble_kernels",
    "fixed_point",
    "gaussian_reference",
    "get_activation",
    "import_neural_tangents",
    "leaky_relu",
    "linearized_prediction",
    "measure",
    "models",
    "perturbative",
    "vertex",
    "rbf_kernel",
    "rbf_running_ridge",
    "rbf_spectrum",
    "scale_resolved",
    "sharding",
    "sweep",
    "train",
    "wilsonian",
    "wilsonian_fixed_point",
]
