"""Equivariant linear maps and depth-wise tensor products (e3nn kernels, canonical irreps layout)."""

from __future__ import annotations

import math
import re

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import SCALAR, as_irreps, check_canonical, sort_irreps

from .radial import RadialMLP

__all__ = ["DepthwiseTensorProduct", "EquivariantLinear", "RadialTensorProduct"]

_W3J_BUFFER = re.compile(r"_w3j_(\d+)_(\d+)_(\d+)")


class EquivariantLinear(nn.Module):
    """Linear map between canonical irreps: one ``[mul_in, mul_out]`` matrix per shared irrep type.

    Parametrised like ``torch.nn.Linear`` (weights ``N(0, 1/mul_in)``, no normalisation constant in
    the forward pass; Equiformer's ``LinearRS``), so optimiser settings transfer from the paper.
    Output irrep types absent from the input are zero. ``0e`` outputs get a bias (zero at start).

    Args:
        irreps_in, irreps_out: canonical irreps (sorted, even parity first, each type once).
        bias: add a bias to the ``0e`` outputs.
    """

    def __init__(self, irreps_in: str | o3.Irreps, irreps_out: str | o3.Irreps, bias: bool = True) -> None:
        super().__init__()
        self.irreps_in = check_canonical(irreps_in, "EquivariantLinear irreps_in")
        self.irreps_out = check_canonical(irreps_out, "EquivariantLinear irreps_out")
        in_blocks = {ir: (mul, sl) for (mul, ir), sl in zip(self.irreps_in, self.irreps_in.slices())}
        self.weights = nn.ParameterList()
        # (input start, mul_in, mul_out, dim, weight index or -1 for a zero block)
        self._plan: list[tuple[int, int, int, int, int]] = []
        for mul_out, ir in self.irreps_out:
            if ir in in_blocks:
                mul_in, sl = in_blocks[ir]
                self.weights.append(nn.Parameter(torch.randn(mul_in, mul_out) / math.sqrt(mul_in)))
                self._plan.append((sl.start, mul_in, mul_out, ir.dim, len(self.weights) - 1))
            else:
                self._plan.append((0, 0, mul_out, ir.dim, -1))
        self.num_bias = sum(mul for mul, ir in self.irreps_out if ir == SCALAR) if bias else 0
        self.bias = nn.Parameter(torch.zeros(self.num_bias)) if self.num_bias else None

    def forward(self, x: Tensor) -> Tensor:
        """x [..., irreps_in.dim] -> [..., irreps_out.dim]."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.irreps_in.dim)
        n = x.shape[0]
        out = []
        for k, (start, mul_in, mul_out, dim, w) in enumerate(self._plan):
            biased = k == 0 and self.bias is not None  # 0e is the first block of canonical irreps
            if w < 0:
                y = self.bias.expand(n, mul_out) if biased else x.new_zeros(n, mul_out * dim)
            elif dim == 1:
                block = x.narrow(1, start, mul_in)
                y = torch.addmm(self.bias, block, self.weights[w]) if biased else block @ self.weights[w]
            else:
                block = x.narrow(1, start, mul_in * dim).view(n, mul_in, dim).transpose(1, 2)
                y = (block @ self.weights[w]).transpose(1, 2).reshape(n, mul_out * dim)
            out.append(y)
        y = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return y.reshape(lead + (self.irreps_out.dim,))

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, bias={self.bias is not None}"


class DepthwiseTensorProduct(nn.Module):
    """Depth-wise ("uvu") tensor product of features with edge spherical harmonics.

    Every input channel ``u`` of ``mul x ir_in`` is coupled with each harmonic ``ir_sh`` into each
    ``ir_out`` of ``ir_in x ir_sh`` kept by ``irreps_filter`` (``0e`` always kept), with one weight per
    (channel, path). Weights are per edge (``shared_weights=False``, from a radial MLP) or learned
    and shared. The output is re-ordered into canonical irreps ``self.irreps_out``.

    Args:
        irreps_in: canonical irreps of the features.
        irreps_sh: irreps of the harmonics, multiplicity 1 each (e.g. ``1x0e+1x1o+1x2e``).
        irreps_filter: irrep types allowed in the output (multiplicities ignored).
        shared_weights: learned weights shared by all edges instead of per-edge weights.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_filter: str | o3.Irreps,
        shared_weights: bool = False,
    ) -> None:
        super().__init__()
        self.irreps_in = check_canonical(irreps_in, "DepthwiseTensorProduct irreps_in")
        self.irreps_sh = as_irreps(irreps_sh)
        if any(mul != 1 for mul, _ in self.irreps_sh):
            raise ValueError(f"irreps_sh must have multiplicity 1 per irrep, got {self.irreps_sh}")
        allowed = {ir for _, ir in as_irreps(irreps_filter)} | {SCALAR}
        blocks, instructions = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in allowed:
                        instructions.append((i, j, len(blocks), "uvu", True))
                        blocks.append((mul, ir_out))
        if not blocks:
            raise ValueError(f"no tensor-product path from {self.irreps_in} x {self.irreps_sh} into {irreps_filter}")
        irreps_sorted, perm = sort_irreps(o3.Irreps(blocks))
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(
            self.irreps_in,
            self.irreps_sh,
            irreps_sorted,
            instructions,
            internal_weights=shared_weights,
            shared_weights=shared_weights,
        )
        self.irreps_out = irreps_sorted.simplify()
        self.weight_numel = self.tp.weight_numel

    def forward(self, x: Tensor, sh: Tensor, weight: Tensor | None = None) -> Tensor:
        """x [E, irreps_in.dim], sh [E, irreps_sh.dim], weight [E, weight_numel] (per-edge) -> [E, irreps_out.dim]."""
        return self.tp(x, sh, weight)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - torch.nn.Module hook
        """After ``.to()/.double()/...``, re-derive e3nn's Clebsch-Gordan buffers from its float64 cache.

        e3nn stores them in the dtype the module was built in; a model built in float32 and then
        cast to float64 would otherwise carry float32-rounded coefficients (equivariance ~1e-7).
        """
        super()._apply(fn, *args, **kwargs)
        for module in self.tp.modules():
            for name, buffer in list(module._buffers.items()):
                match = _W3J_BUFFER.fullmatch(name)
                if match and buffer is not None and buffer.is_floating_point():
                    l1, l2, l3 = (int(g) for g in match.groups())
                    module._buffers[name] = o3.wigner_3j(l1, l2, l3, dtype=buffer.dtype, device=buffer.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.irreps_in} x {self.irreps_sh} -> {self.irreps_out}, weight_numel={self.weight_numel}"


class RadialTensorProduct(nn.Module):
    """Depth-wise tensor product whose per-edge weights come from a radial MLP of the edge's radial basis.

    Args:
        irreps_in, irreps_sh, irreps_filter: as for :class:`DepthwiseTensorProduct`.
        radial_channels: ``[num_basis, hidden...]``; the MLP's output size is the TP's weight count.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_filter: str | o3.Irreps,
        radial_channels: list[int],
    ) -> None:
        super().__init__()
        self.dtp = DepthwiseTensorProduct(irreps_in, irreps_sh, irreps_filter, shared_weights=False)
        self.radial = RadialMLP(list(radial_channels) + [self.dtp.weight_numel])
        self.irreps_in = self.dtp.irreps_in
        self.irreps_out = self.dtp.irreps_out

    def forward(self, x: Tensor, sh: Tensor, edge_scalars: Tensor) -> Tensor:
        """x [E, irreps_in.dim], sh [E, irreps_sh.dim], edge_scalars [E, num_basis] -> [E, irreps_out.dim]."""
        return self.dtp(x, sh, self.radial(edge_scalars))
