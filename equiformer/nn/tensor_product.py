"""Equivariant linear maps and depth-wise tensor products (e3nn kernels, canonical irreps layout)."""

from __future__ import annotations

import math
import re

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import SCALAR, as_irreps, canonical_irreps, check_canonical, sort_irreps

from .radial import RadialMLP

__all__ = ["TP_BACKENDS", "DepthwiseTensorProduct", "EquivariantLinear", "RadialTensorProduct"]

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
        self._dims = (self.irreps_in.dim, self.irreps_out.dim)  # plain ints: forward touches no Irreps (compile)
        in_blocks = {ir: (b, mul) for b, (mul, ir) in enumerate(self.irreps_in)}
        self._split = [mul * ir.dim for mul, ir in self.irreps_in]
        self.weights = nn.ParameterList()
        # (input block, mul_in, mul_out, dim, weight index or -1 for a zero block)
        self._plan: list[tuple[int, int, int, int, int]] = []
        for mul_out, ir in self.irreps_out:
            if ir in in_blocks:
                b, mul_in = in_blocks[ir]
                self.weights.append(nn.Parameter(torch.randn(mul_in, mul_out) / math.sqrt(mul_in)))
                self._plan.append((b, mul_in, mul_out, ir.dim, len(self.weights) - 1))
            else:
                self._plan.append((0, 0, mul_out, ir.dim, -1))
        self.num_bias = sum(mul for mul, ir in self.irreps_out if ir == SCALAR) if bias else 0
        self.bias = nn.Parameter(torch.zeros(self.num_bias)) if self.num_bias else None

    def forward(self, x: Tensor) -> Tensor:
        """x [..., irreps_in.dim] -> [..., irreps_out.dim]."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self._dims[0])
        n = x.shape[0]
        blocks = x.split(self._split, dim=1)  # one cat in backward (narrow would zero-fill per block)
        out = []
        for k, (b, mul_in, mul_out, dim, w) in enumerate(self._plan):
            biased = k == 0 and self.bias is not None  # 0e is the first block of canonical irreps
            if w < 0:
                y = self.bias.expand(n, mul_out) if biased else x.new_zeros(n, mul_out * dim)
            elif dim == 1:
                y = torch.addmm(self.bias, blocks[b], self.weights[w]) if biased else blocks[b] @ self.weights[w]
            else:
                block = blocks[b].view(n, mul_in, dim).transpose(1, 2)
                y = (block @ self.weights[w]).transpose(1, 2).reshape(n, mul_out * dim)
            out.append(y)
        y = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return y.reshape(lead + (self._dims[1],))

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, bias={self.bias is not None}"


TP_BACKENDS = ("fused", "e3nn")


class DepthwiseTensorProduct(nn.Module):
    """Depth-wise ("uvu") tensor product of features with edge spherical harmonics.

    Every input channel ``u`` of ``mul x ir_in`` is coupled with each harmonic ``ir_sh`` into each
    ``ir_out`` of ``ir_in x ir_sh`` kept by ``irreps_filter`` (``0e`` always kept), with one weight per
    (channel, path): ``out_k = w * sqrt(2 l_out + 1) * sum_ij C_ijk x_i Y_j`` (e3nn's "component"
    normalisation). Weights are per edge (``shared_weights=False``, from a radial MLP) or learned
    and shared. The output is re-ordered into canonical irreps ``self.irreps_out``.

    Two interchangeable backends with the same parameters and weight layout (e3nn's):

    * ``"fused"`` (default): per input block one outer product with the harmonics, one GEMM with
      a Clebsch-Gordan matrix of all its paths, one weight multiply; then one gather into the
      output layout. A handful of kernels instead of several per path, forward and backward.
    * ``"e3nn"``: ``e3nn.o3.TensorProduct``, the reference.

    Args:
        irreps_in: canonical irreps of the features.
        irreps_sh: irreps of the harmonics, multiplicity 1 each (e.g. ``1x0e+1x1o+1x2e``).
        irreps_filter: irrep types allowed in the output (multiplicities ignored).
        shared_weights: learned weights shared by all edges instead of per-edge weights.
        backend: ``"fused"`` or ``"e3nn"``.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_filter: str | o3.Irreps,
        shared_weights: bool = False,
        backend: str = "fused",
    ) -> None:
        super().__init__()
        if backend not in TP_BACKENDS:
            raise ValueError(f"unknown tensor-product backend {backend!r}; choose one of {TP_BACKENDS}")
        self.backend = backend
        self.irreps_in = check_canonical(irreps_in, "DepthwiseTensorProduct irreps_in")
        self.irreps_sh = as_irreps(irreps_sh)
        if any(mul != 1 for mul, _ in self.irreps_sh):
            raise ValueError(f"irreps_sh must have multiplicity 1 per irrep, got {self.irreps_sh}")
        allowed = canonical_irreps(o3.Irreps([(1, ir) for _, ir in as_irreps(irreps_filter)] + [(1, SCALAR)]))
        # paths ordered by (input block, output irrep, harmonic): the weights of one input block and
        # one output irrep are contiguous, and sorting by output irrep keeps (block, harmonic) order
        blocks, instructions = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for _, ir_out in allowed:
                for j, (_, ir_sh) in enumerate(self.irreps_sh):
                    if ir_out in ir_in * ir_sh:
                        instructions.append((i, j, len(blocks)))
                        blocks.append((mul, ir_out))
        if not blocks:
            raise ValueError(f"no tensor-product path from {self.irreps_in} x {self.irreps_sh} into {irreps_filter}")
        irreps_sorted, perm = sort_irreps(o3.Irreps(blocks))
        self.instructions = [(i, j, perm[k]) for i, j, k in instructions]
        self.irreps_out = irreps_sorted.simplify()
        self.weight_numel = sum(self.irreps_in[i].mul for i, _, _ in self.instructions)
        self.shared_weights = shared_weights
        if shared_weights:
            self.weight = nn.Parameter(torch.randn(self.weight_numel))
        else:
            self.register_parameter("weight", None)

        self.tp = None
        if backend == "e3nn":
            self.tp = o3.TensorProduct(
                self.irreps_in,
                self.irreps_sh,
                irreps_sorted,
                [(i, j, k, "uvu", True) for i, j, k in self.instructions],
                internal_weights=False,
                shared_weights=shared_weights,
            )
            for module in self.tp.modules():  # constants only: keep state dicts backend-independent
                module._non_persistent_buffers_set.update(module._buffers)
        else:
            self._build_fused_plan(irreps_sorted)

    def _build_fused_plan(self, irreps_sorted: o3.Irreps) -> None:
        """Per input block: one Clebsch-Gordan matrix for all its paths, columns grouped by output irrep."""
        sh_dim, sh_start = self.irreps_sh.dim, [sl.start for sl in self.irreps_sh.slices()]
        self._cg64: list[Tensor] = []  # float64 masters of the cg_* buffers
        # per block: (mul, dim, [(paths, 2l+1) per output irrep group]); pieces: output order of (block, group)
        self._plan: list[tuple[int, int, list[tuple[int, int]]]] = []
        self._split = [mul * ir.dim for mul, ir in self.irreps_in]
        self._weight_split: list[int] = []
        groups_of_irrep: dict[o3.Irrep, list[tuple[int, int]]] = {}
        for b, (mul, ir_in) in enumerate(self.irreps_in):
            paths = [(j, irreps_sorted[k].ir) for i, j, k in self.instructions if i == b]
            columns = sum(ir.dim for _, ir in paths)
            cg = torch.zeros(ir_in.dim * sh_dim, columns, dtype=torch.float64)
            groups: list[tuple[int, int]] = []
            col = 0
            for n, (j, ir_out) in enumerate(paths):
                l2, l3 = self.irreps_sh[j].ir.l, ir_out.l
                w3j = o3.wigner_3j(ir_in.l, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)
                rows = (torch.arange(ir_in.dim)[:, None] * sh_dim + sh_start[j] + torch.arange(2 * l2 + 1)).flatten()
                cg[rows, col : col + ir_out.dim] = w3j.reshape(-1, ir_out.dim)
                col += ir_out.dim
                if n == 0 or paths[n - 1][1] != ir_out:
                    groups_of_irrep.setdefault(ir_out, []).append((b, len(groups)))
                    groups.append((0, ir_out.dim))
                groups[-1] = (groups[-1][0] + 1, ir_out.dim)
            self._plan.append((mul, ir_in.dim, groups))
            self._weight_split += [count * mul for count, _ in groups]
            self._cg64.append(cg)
            self.register_buffer(f"cg_{b}", cg.to(torch.get_default_dtype()), persistent=False)
        self._pieces = [piece for _, ir in irreps_sorted.simplify() for piece in groups_of_irrep[ir]]

    def forward(self, x: Tensor, sh: Tensor, weight: Tensor | None = None) -> Tensor:
        """x [E, irreps_in.dim], sh [E, irreps_sh.dim], weight [E, weight_numel] (per-edge) -> [E, irreps_out.dim]."""
        if self.shared_weights:
            weight = self.weight
        elif weight is None:
            raise ValueError("DepthwiseTensorProduct with per-edge weights needs weight [E, weight_numel]")
        if self.tp is not None:
            return self.tp(x, sh, weight)
        num_edges = x.shape[0]
        lead = () if self.shared_weights else (num_edges,)
        sh = sh.view(num_edges, 1, 1, -1)
        weights = iter(weight.split(self._weight_split, dim=-1))
        pieces: list[list[Tensor]] = []
        for b, (block, (mul, dim, groups)) in enumerate(zip(x.split(self._split, dim=1), self._plan)):
            outer = (block.view(num_edges, mul, dim, 1) * sh).reshape(num_edges * mul, -1)  # [E*mul, dim*sh_dim]
            paths = (outer @ getattr(self, f"cg_{b}")).view(num_edges, mul, -1)  # [E, mul, columns]
            block_pieces = []
            for values, (count, d3) in zip(paths.split([c * d for c, d in groups], dim=2), groups):
                values = values.view(num_edges, mul, count, d3).transpose(1, 2)  # [E, paths, mul, 2l+1]
                w = next(weights).view(lead + (count, mul, 1))
                block_pieces.append((values * w).reshape(num_edges, count * mul * d3))
            pieces.append(block_pieces)
        out = [pieces[b][g] for b, g in self._pieces]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - torch.nn.Module hook
        """After ``.to()/.double()/...``, re-derive the Clebsch-Gordan coefficients from float64.

        They are stored in the dtype the module was built in; a model built in float32 and then
        cast to float64 would otherwise carry float32-rounded coefficients (equivariance ~1e-7).
        """
        super()._apply(fn, *args, **kwargs)
        for b, master in enumerate(getattr(self, "_cg64", [])):
            buffer = self._buffers[f"cg_{b}"]
            self._buffers[f"cg_{b}"] = master.to(dtype=buffer.dtype, device=buffer.device)
        if self.tp is not None:
            for module in self.tp.modules():
                for name, buffer in list(module._buffers.items()):
                    match = _W3J_BUFFER.fullmatch(name)
                    if match and buffer is not None and buffer.is_floating_point():
                        l1, l2, l3 = (int(g) for g in match.groups())
                        module._buffers[name] = o3.wigner_3j(l1, l2, l3, dtype=buffer.dtype, device=buffer.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} x {self.irreps_sh} -> {self.irreps_out}, weight_numel={self.weight_numel}, "
            f"backend={self.backend!r}"
        )


class RadialTensorProduct(nn.Module):
    """Depth-wise tensor product whose per-edge weights come from a radial MLP of the edge's radial basis.

    Args:
        irreps_in, irreps_sh, irreps_filter, backend: as for :class:`DepthwiseTensorProduct`.
        radial_channels: ``[num_basis, hidden...]``; the MLP's output size is the TP's weight count.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_filter: str | o3.Irreps,
        radial_channels: list[int],
        backend: str = "fused",
    ) -> None:
        super().__init__()
        self.dtp = DepthwiseTensorProduct(irreps_in, irreps_sh, irreps_filter, shared_weights=False, backend=backend)
        self.radial = RadialMLP(list(radial_channels) + [self.dtp.weight_numel])
        self.irreps_in = self.dtp.irreps_in
        self.irreps_out = self.dtp.irreps_out

    def forward(self, x: Tensor, sh: Tensor, edge_scalars: Tensor) -> Tensor:
        """x [E, irreps_in.dim], sh [E, irreps_sh.dim], edge_scalars [E, num_basis] -> [E, irreps_out.dim]."""
        return self.dtp(x, sh, self.radial(edge_scalars))
