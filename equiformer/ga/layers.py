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


def _equilinear_layout(in_mv: int, out_mv: int, in_s: int, out_s: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each parameter of an :class:`EquiLinear` lands in its fused ``[out, in (+1)]`` matrix.

    The parameters, flattened and concatenated in the order ``weight, s2mv, mv2s, s2s, bias_mv,
    bias_s`` (those that exist), form ``theta``; the fused matrix ``W`` (rows: ``out_mv*16 + out_s``
    outputs; columns: ``in_mv*16 + in_s`` inputs, then one bias column if ``bias``) is zero except
    ``W.flatten()[dst] = theta[src] * sign``. Every basis map puts its weight on a different
    (input blade, output blade) entry, so ``dst`` has no repeats. Returns ``(src, dst, sign)``.
    """
    basis = _BASIS  # [9, 16 (x, in), 16 (y, out)]
    b_idx, x_idx, y_idx = basis.nonzero(as_tuple=True)
    if len(set(zip(x_idx.tolist(), y_idx.tolist()))) != len(b_idx):  # each (x, y) entry of at most one map
        raise AssertionError("equivariant basis maps overlap; the fused layout needs disjoint supports")
    n_in, n_out = in_mv * 16 + in_s, out_mv * 16 + out_s
    cols = n_in + (1 if bias else 0)
    src, dst, sign = [], [], []
    o = torch.arange(out_mv)[:, None, None]
    i = torch.arange(in_mv)[None, :, None]
    # weight [out_mv, in_mv, 9]: W[o*16 + y, i*16 + x] = weight[o, i, b] * B[b, x, y]
    src.append(((o * in_mv + i) * NUM_BASIS + b_idx).reshape(-1))
    dst.append(((o * 16 + y_idx) * cols + i * 16 + x_idx).reshape(-1))
    sign.append(basis[b_idx, x_idx, y_idx].expand(out_mv, in_mv, -1).reshape(-1))
    offset = out_mv * in_mv * NUM_BASIS

    def block(rows: torch.Tensor, cols_: torch.Tensor) -> None:  # a dense parameter [len(rows), len(cols_)]
        nonlocal offset
        r, c = rows[:, None], cols_[None, :]
        src.append(offset + torch.arange(r.numel() * c.numel()))
        dst.append((r * cols + c).reshape(-1))
        sign.append(torch.ones(r.numel() * c.numel(), dtype=torch.float64))
        offset += r.numel() * c.numel()

    mv_scalar_rows = torch.arange(out_mv) * 16  # output blade 0 of each mv channel
    s_rows = out_mv * 16 + torch.arange(out_s)
    if in_s:
        block(mv_scalar_rows, in_mv * 16 + torch.arange(in_s))  # s2mv [out_mv, in_s]
    if out_s:
        block(s_rows, torch.arange(in_mv) * 16)  # mv2s [out_s, in_mv]: input blade 0
    if in_s and out_s:
        block(s_rows, in_mv * 16 + torch.arange(in_s))  # s2s [out_s, in_s]
    if bias:
        block(mv_scalar_rows, torch.tensor([n_in]))  # bias_mv [out_mv]
        if out_s:
            block(s_rows, torch.tensor([n_in]))  # bias_s [out_s]
    return torch.cat(src), torch.cat(dst), torch.cat(sign)


class EquiLinear(nn.Module):
    """Equivariant linear map ``(mv [..., in_mv, 16], s [..., in_s]) -> (mv [..., out_mv, 16], s [..., out_s])``.

    ``mv_out[o] = sum_i sum_b w[o, i, b] B_b(mv[i])`` over the 9 basis maps, plus
    ``W_s2mv s`` and a bias on the scalar component; ``s_out = W_ss s + W_mv2s <mv>_0 + b``.
    Only the grade-0 component feeds the scalars (the pseudoscalar is not reflection-invariant).

    Computed as one ``F.linear`` of ``[mv.flatten(), s]`` with a fused
    ``[out_mv*16 + out_s, in_mv*16 + in_s]`` matrix (and bias) scattered from all parameters in
    one indexing operation (:func:`_equilinear_layout`): a handful of kernels per layer instead of
    one per coupling, which matters for small inputs where kernel launches dominate.
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
        src, dst, sign = _equilinear_layout(in_mv, out_mv, in_s, out_s, bias)
        # not in the state dict (derived from the sizes); follow .to(device) / .double()
        self.register_buffer("_src", src, persistent=False)
        self.register_buffer("_dst", dst, persistent=False)
        self.register_buffer("_sign", sign.to(torch.get_default_dtype()), persistent=False)
        self._unit_signs = bool((sign == 1).all())  # true for this basis (e0 x keeps the sign): skip the multiply
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

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [out_mv*16 + out_s, in_mv*16 + in_s], bias [out_mv*16 + out_s] | None)`` for ``F.linear``."""
        params = [p for p in (self.weight, self.s2mv, self.mv2s, self.s2s, self.bias_mv, self.bias_s) if p is not None]
        theta = torch.cat([p.reshape(-1) for p in params])
        n_out, n_in = self.out_mv * 16 + self.out_s, self.in_mv * 16 + self.in_s
        cols = n_in + (1 if self.bias_mv is not None else 0)
        vals = theta[self._src] if self._unit_signs else theta[self._src] * self._sign.to(theta.dtype)
        w = theta.new_zeros(n_out * cols).index_put((self._dst,), vals).view(n_out, cols)
        if self.bias_mv is None:
            return w, None
        w, b = w.split([n_in, 1], dim=1)  # split, not slicing: its backward is one cat, not zeros + copy per slice
        return w, b.squeeze(1)

    def dense_kernel(self) -> torch.Tensor:
        """The multivector part as one ``[in_mv*16, out_mv*16]`` matrix (``mv.flatten() @ kernel``)."""
        w, _ = self.fused_weight()
        return w[: self.out_mv * 16, : self.in_mv * 16].t()

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mv.shape[-2:] != (self.in_mv, 16):
            raise ValueError(f"EquiLinear expects multivectors [..., {self.in_mv}, 16], got {tuple(mv.shape)}")
        if s is not None and s.shape[-1] != self.in_s:
            raise ValueError(f"EquiLinear expects scalars [..., {self.in_s}], got {tuple(s.shape)}")
        if s is None and self.in_s:
            raise ValueError(f"EquiLinear expects scalars [..., {self.in_s}], got None")
        lead = mv.shape[:-2]
        x = mv.reshape(*lead, self.in_mv * 16)
        if self.in_s:
            x = torch.cat([x, s.expand(*lead, self.in_s)], dim=-1)
        w, b = self.fused_weight()
        out_mv, out_s = F.linear(x, w, b).split([self.out_mv * 16, self.out_s], dim=-1)
        return out_mv.unflatten(-1, (self.out_mv, 16)), out_s

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
