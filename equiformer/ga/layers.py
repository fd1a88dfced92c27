"""E(3)-equivariant GATr layers on (multivectors ``[..., C, 16]``, scalars ``[..., S]``).

Every layer takes and returns the pair ``(mv, s)``: ``mv`` holds ``C`` multivector channels
of G(3,0,1), ``s`` holds ``S`` auxiliary invariant scalar channels (``S`` may be 0). The
group acts on ``mv`` channel-wise by the versor sandwich (:func:`equiformer.ga.sandwich`)
and trivially on ``s``.

- :class:`EquiLinear`: the 9-map basis of equivariant linear maps (5 grade projections,
  left multiplication by e0 of grades 0..3), mixing channels; scalars <-> the mv scalar
  component. Folded into one dense ``[C_in*16, C_out*16]`` GEMM.
- :class:`GeometricBilinear`: geometric product and reference-equivariant join, concatenated.
- :class:`EquiLayerNorm`: divide by the channel-mean of the invariant norm ``<x, x>``.
- :class:`ScalarGatedGELU`: ``x * GELU(<x>_0)``.
- :class:`GradeDropout`: dropout that zeroes whole grades of a channel.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from equiformer.ga.algebra import GP, GRADES, table
from equiformer.ga.products import geometric_product, join

__all__ = [
    "equi_linear_basis",
    "EquiLinear",
    "GeometricBilinear",
    "EquiLayerNorm",
    "ScalarGatedGELU",
    "GradeDropout",
]

NUM_BASIS = 9


def _make_basis() -> torch.Tensor:
    basis = torch.zeros(NUM_BASIS, 16, 16, dtype=torch.float64)
    grades = torch.tensor(GRADES.tolist())
    for k in range(5):  # grade projections
        basis[k] = torch.diag((grades == k).double())
    e0_left = torch.tensor(GP[1].tolist(), dtype=torch.float64)  # [16 (in), 16 (out)]: (e0 x)_m = sum_i x_i GP[e0, i, m]
    for k in range(4):  # x -> e0 <x>_k
        basis[5 + k] = e0_left * (grades == k).double()[:, None]
    return basis


_BASIS = _make_basis()


@functools.lru_cache(maxsize=None)
def _basis_cached(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a cached tensor made under inference_mode (e.g. Lightning's validation) could never be
    # saved for backward later: always create it as a normal tensor
    with torch.inference_mode(False):
        return _BASIS.to(device=device, dtype=dtype)


def equi_linear_basis(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 9 equivariant linear maps as ``[9, 16 (in), 16 (out)]`` matrices (``y = x @ B[b]``).

    ``B[0..4]``: grade projections ``<x>_k``; ``B[5..8]``: ``e0 <x>_k`` for k = 0..3.
    """
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling():  # a graph constant; the cache would break fullgraph
        return _BASIS.to(device=device, dtype=dtype)
    return _basis_cached(device, dtype)


def _empty_scalars(mv: torch.Tensor) -> torch.Tensor:
    return mv.new_zeros(*mv.shape[:-2], 0)


class EquiLinear(nn.Module):
    """Equivariant linear map ``(mv [..., in_mv, 16], s [..., in_s]) -> (mv [..., out_mv, 16], s [..., out_s])``.

    ``mv_out[o] = sum_i sum_b w[o, i, b] B_b(mv[i])`` over the 9 basis maps, plus
    ``W_s2mv s`` and a bias on the scalar component; ``s_out = W_ss s + W_mv2s <mv>_0 + b``.
    Only the grade-0 component feeds the scalars (the pseudoscalar is not reflection-invariant).
    """

    def __init__(self, in_mv: int, out_mv: int, in_s: int = 0, out_s: int = 0, bias: bool = True) -> None:
        super().__init__()
        if min(in_mv, out_mv) < 1 or min(in_s, out_s) < 0:
            raise ValueError(f"EquiLinear needs in_mv, out_mv >= 1 and in_s, out_s >= 0, got {in_mv, out_mv, in_s, out_s}")
        self.in_mv, self.out_mv, self.in_s, self.out_s = in_mv, out_mv, in_s, out_s
        self.weight = nn.Parameter(torch.empty(out_mv, in_mv, NUM_BASIS))
        self.s2mv = nn.Parameter(torch.empty(out_mv, in_s)) if in_s else None
        self.mv2s = nn.Parameter(torch.empty(out_s, in_mv)) if out_s else None
        self.s2s = nn.Parameter(torch.empty(out_s, in_s)) if (in_s and out_s) else None
        self.bias_mv = nn.Parameter(torch.zeros(out_mv)) if bias else None
        self.bias_s = nn.Parameter(torch.zeros(out_s)) if (bias and out_s) else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-variance outputs for unit-variance inputs, split between the contributing maps."""
        mix = 0.5 if self.in_s else 1.0  # scalar outputs draw on two sources when in_s > 0
        std = 1.0 / math.sqrt(self.in_mv)
        self.weight.normal_(0.0, std)
        self.weight[..., 0].mul_(math.sqrt(mix))
        self.weight[..., 5:].mul_(math.sqrt(0.5))  # e0 components draw on two maps each
        if self.s2mv is not None:
            self.s2mv.normal_(0.0, math.sqrt(mix / self.in_s))
        if self.mv2s is not None:
            self.mv2s.normal_(0.0, math.sqrt(mix / self.in_mv))
        if self.s2s is not None:
            self.s2s.normal_(0.0, math.sqrt(mix / self.in_s))

    def dense_kernel(self) -> torch.Tensor:
        """The multivector part as one ``[in_mv*16, out_mv*16]`` matrix."""
        basis = equi_linear_basis(self.weight.device, self.weight.dtype)
        k = torch.einsum("oib,bxy->ixoy", self.weight, basis)
        return k.reshape(self.in_mv * 16, self.out_mv * 16)

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mv.shape[-2:] != (self.in_mv, 16):
            raise ValueError(f"EquiLinear expects multivectors [..., {self.in_mv}, 16], got {tuple(mv.shape)}")
        if s is None:
            s = _empty_scalars(mv)
        if s.shape[-1] != self.in_s:
            raise ValueError(f"EquiLinear expects scalars [..., {self.in_s}], got {tuple(s.shape)}")
        lead = mv.shape[:-2]
        out = (mv.reshape(*lead, self.in_mv * 16) @ self.dense_kernel()).reshape(*lead, self.out_mv, 16)
        extra = None
        if self.s2mv is not None:
            extra = s @ self.s2mv.t()
        if self.bias_mv is not None:
            extra = self.bias_mv if extra is None else extra + self.bias_mv
        if extra is not None:
            out = out + F.pad(extra.unsqueeze(-1), (0, 15)).expand_as(out)
        if self.out_s:
            s_out = mv[..., 0] @ self.mv2s.t()
            if self.s2s is not None:
                s_out = s_out + s @ self.s2s.t()
            if self.bias_s is not None:
                s_out = s_out + self.bias_s
        else:
            s_out = out.new_zeros(*lead, 0)
        return out, s_out

    def extra_repr(self) -> str:
        return f"mv {self.in_mv}->{self.out_mv}, s {self.in_s}->{self.out_s}"


class GeometricBilinear(nn.Module):
    """``(mv, s) -> (mv [..., out_mv, 16], s [..., out_s])`` via geometric product and join.

    Four equivariant linear maps make left/right inputs; ``hidden_mv // 2`` channels of
    ``left * right`` (geometric product) and ``hidden_mv // 2`` channels of
    ``join(left, right, reference)`` are concatenated and mapped (with ``s``) by a final
    :class:`EquiLinear`. ``reference`` ``[..., 16]`` (broadcast over the channel axis) fixes
    the join's reflection sign by its e123 component; without it the join channels are
    only equivariant under proper motions.
    """

    def __init__(self, in_mv: int, out_mv: int, in_s: int = 0, out_s: int = 0, hidden_mv: int | None = None) -> None:
        super().__init__()
        hidden_mv = hidden_mv or 2 * out_mv
        if hidden_mv < 2 or hidden_mv % 2:
            raise ValueError(f"hidden_mv must be an even number >= 2, got {hidden_mv}")
        self.half = hidden_mv // 2
        self.inputs = EquiLinear(in_mv, 4 * self.half, in_s, 0)
        self.output = EquiLinear(hidden_mv, out_mv, in_s, out_s)

    def forward(
        self, mv: torch.Tensor, s: torch.Tensor | None = None, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.inputs(mv, s)
        gl, gr, jl, jr = h.split(self.half, dim=-2)
        ref = None if reference is None else reference.unsqueeze(-2)
        hidden = torch.cat([geometric_product(gl, gr), join(jl, jr, ref)], dim=-2)
        return self.output(hidden, s)


class EquiLayerNorm(nn.Module):
    """``mv / sqrt(mean_c <mv_c, mv_c> + eps)`` and a plain layer norm of ``s`` (no parameters).

    ``<x, x>`` is the invariant inner product (blades without e0), so the map is E(3)-equivariant.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = table("INNER_MASK", mv.device, mv.dtype)
        sq = (mv * mv * mask).sum(-1).mean(-1, keepdim=True)  # [..., 1]
        mv = mv / torch.sqrt(sq + self.eps).unsqueeze(-1)
        if s is None:
            s = _empty_scalars(mv)
        elif s.shape[-1] > 0:
            s = F.layer_norm(s, s.shape[-1:], eps=self.eps)
        return mv, s


class ScalarGatedGELU(nn.Module):
    """``mv * GELU(<mv>_0)`` per channel and ``GELU(s)``; equivariant because ``<mv>_0`` is invariant."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        gate = F.gelu(mv[..., 0:1], approximate=self.approximate)
        if s is None:
            s = _empty_scalars(mv)
        return mv * gate, F.gelu(s, approximate=self.approximate)


class GradeDropout(nn.Module):
    """Dropout that keeps or zeroes each grade of each multivector channel as a whole.

    A grade is an invariant subspace of the group action, so the masked output is equivariant
    for every draw of the mask (the mask does not depend on the values). Scalars get ordinary
    dropout. Identity in eval mode or with ``p = 0``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if s is None:
            s = _empty_scalars(mv)
        if not self.training or self.p == 0.0:
            return mv, s
        keep = torch.rand(*mv.shape[:-1], 5, device=mv.device, dtype=mv.dtype) >= self.p
        keep = keep[..., table("GRADES", mv.device)].to(mv.dtype) / (1.0 - self.p)
        return mv * keep, F.dropout(s, self.p, training=True)
