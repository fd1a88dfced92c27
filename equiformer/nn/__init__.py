"""Shared equivariant layers (e3nn-based): radial bases, norms, gates, tensor products, attention.

All irreps features use the canonical layout of :mod:`equiformer.o3` (sorted, even parity first,
each irrep type once). Edge conventions: ``edge_index`` row 0 = source j, row 1 = target i.
"""

from .activation import Gate, SmoothLeakyReLU
from .attention import ATTENTION_TYPES, EquivariantGraphAttention
from .embedding import AtomEmbedding, EdgeDegreeEmbedding
from .feedforward import EquivariantFeedForward
from .norm import EquivariantLayerNorm
from .radial import BesselRadialBasis, GaussianRadialBasis, PolynomialEnvelope, RadialMLP, build_radial_basis
from .scatter import segment_max, segment_mean, segment_softmax, segment_sum
from .tensor_product import DepthwiseTensorProduct, EquivariantLinear, RadialTensorProduct

__all__ = [
    "ATTENTION_TYPES",
    "AtomEmbedding",
    "BesselRadialBasis",
    "DepthwiseTensorProduct",
    "EdgeDegreeEmbedding",
    "EquivariantFeedForward",
    "EquivariantGraphAttention",
    "EquivariantLayerNorm",
    "EquivariantLinear",
    "GaussianRadialBasis",
    "Gate",
    "PolynomialEnvelope",
    "RadialMLP",
    "RadialTensorProduct",
    "SmoothLeakyReLU",
    "build_radial_basis",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
]
