"""GATr (Brehmer et al., NeurIPS 2023): the projective geometric algebra G(3,0,1) and its layers.

Multivectors are tensors ``[..., 16]`` over the blades
1, e0, e1, e2, e3, e01, e02, e03, e12, e13, e23, e012, e013, e023, e123, e0123
(e0^2 = 0, e1^2 = e2^2 = e3^2 = 1).

- algebra / products: tables computed from the blade bitmasks; ``dual`` is the metric-free
  right complement (``e_A ^ dual(e_A) = e0123``), ``join(x, y) = undual(dual(x) ^ dual(y))``
  (clifford's ``vee``), made E(3)-equivariant by the e123 component of a reference.
- embedding: points ``e123 - x e023 + y e013 - z e012``, planes ``n.e + d e0``,
  translators ``1 - t.e0i/2``, rotors from quaternions, reflections = planes.
- The group acts by ``sandwich(u, x)`` = ``u x u^-1`` (even u) or ``u x^ u^-1`` (odd u).
- layers / attention / net / encoder: EquiLinear, GeometricBilinear, EquiLayerNorm,
  ScalarGatedGELU, GradeDropout, SelfAttention (on SDPA), GATrBlock, GATr, AxialGATr,
  GATrPointEncoder; every layer maps ``(mv [..., C, 16], s [..., S])`` to the same pair.

GATr's method may be subject to Qualcomm's patent application US 20240383132; this code is
written from the paper, not from the reference implementation.
"""

from equiformer.ga.algebra import BLADE_NAMES, GRADES, blade_index
from equiformer.ga.embedding import (
    embed_direction,
    embed_plane,
    embed_point,
    embed_pseudoscalar,
    embed_reflection,
    embed_rotation,
    embed_scalar,
    embed_translation,
    extract_direction,
    extract_plane,
    extract_point,
    extract_pseudoscalar,
    extract_scalar,
    quaternion_to_matrix,
)
from equiformer.ga.products import (
    dual,
    geometric_product,
    grade_involution,
    grade_project,
    inner_product,
    join,
    norm,
    outer_product,
    reverse,
    sandwich,
    undual,
    versor_inverse,
)
from equiformer.ga.transforms import random_e3
from equiformer.ga.layers import EquiLayerNorm, EquiLinear, GeometricBilinear, GradeDropout, ScalarGatedGELU
from equiformer.ga.attention import SelfAttention, geometric_attention
from equiformer.ga.net import GATr, AxialGATr, GATrBlock, from_padded, reference_multivector, to_padded
from equiformer.ga.encoder import GATrPointEncoder

__all__ = [
    "BLADE_NAMES", "GRADES", "blade_index",
    "geometric_product", "outer_product", "join", "inner_product", "norm", "reverse",
    "grade_involution", "dual", "undual", "grade_project", "versor_inverse", "sandwich",
    "embed_scalar", "extract_scalar", "embed_pseudoscalar", "extract_pseudoscalar",
    "embed_point", "extract_point", "embed_direction", "extract_direction",
    "embed_plane", "extract_plane", "embed_translation", "embed_rotation", "embed_reflection",
    "quaternion_to_matrix", "random_e3",
    "EquiLinear", "GeometricBilinear", "EquiLayerNorm", "ScalarGatedGELU", "GradeDropout",
    "SelfAttention", "geometric_attention", "GATrBlock", "GATr", "AxialGATr", "GATrPointEncoder",
    "reference_multivector", "to_padded", "from_padded",
]
