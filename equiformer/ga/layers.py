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

from equiformer.ga.algebra import GP, GRADES, JOIN, table

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


def _dense_layout(in_mv: int, out_mv: int, in_s: int, out_s: int, bias: bool) -> torch.Tensor:
    """``[out, in (+1)]`` long: the ``theta`` position each fused-matrix entry holds, ``-1`` where it is zero."""
    src, dst, sign = _equilinear_layout(in_mv, out_mv, in_s, out_s, bias)
    if not bool((sign == 1).all()):  # every basis map has unit entries; the scatter below relies on it
        raise AssertionError("equivariant basis maps with non-unit entries need a signed scatter")
    n_out, cols = out_mv * 16 + out_s, in_mv * 16 + in_s + (1 if bias else 0)
    dense = torch.full((n_out * cols,), -1, dtype=torch.long)
    dense[dst] = src
    return dense.view(n_out, cols)


def _scatter_plan(dense: torch.Tensor, n_in: int, bias: bool, rows: torch.Tensor, cols: torch.Tensor) -> list[torch.Tensor]:
    """``[src_w, flat_w, flat_wt, src_b, row_b]``: ``W.flatten()[flat_w] = theta[src_w]`` (``flat_wt``: the same
    entries of ``W.t().flatten()``) and ``b[row_b] = theta[src_b]``.

    ``rows`` / ``cols``: standard output rows / input columns in the order wanted, ``-1`` for an
    all-zero row / an ignored column (``src_b`` and ``row_b`` are empty without a bias).
    """
    w = dense[rows.clamp_min(0)][:, cols.clamp_min(0)]
    w[rows < 0] = -1
    w[:, cols < 0] = -1
    r, c = (w >= 0).nonzero(as_tuple=True)
    b = dense[rows.clamp_min(0), n_in] if bias else torch.full((len(rows),), -1)
    b[rows < 0] = -1
    (rb,) = (b >= 0).nonzero(as_tuple=True)
    return [w[r, c], r * len(cols) + c, c * len(rows) + r, b[rb], rb]


class _ScatterWeight(torch.autograd.Function):
    """Parameters -> ``(W [rows, cols], b [rows])`` with ``W.flatten()[flat_w] = theta[src_w]`` (``theta``: the
    flattened parameters concatenated) and zeros elsewhere. One autograd node; forward and backward
    touch only the nonzero entries (a tenth of ``W``) besides the zero fill."""

    @staticmethod
    def forward(ctx, src_w, flat_w, flat_wt, src_b, row_b, rows: int, cols: int, *params):  # noqa: ANN001, ANN205
        theta = torch.cat([p.view(-1) if p.is_contiguous() else p.reshape(-1) for p in params])
        w = theta.new_zeros(rows * cols).scatter_(0, flat_w, theta.index_select(0, src_w)).view(rows, cols)
        ctx.save_for_backward(src_w, flat_w, flat_wt, src_b, row_b)
        ctx.shapes = [p.shape for p in params]
        ctx.n_theta = theta.numel()
        if src_b.numel() == 0:
            return w
        return w, theta.new_zeros(rows).scatter_(0, row_b, theta.index_select(0, src_b))

    @staticmethod
    def backward(ctx, grad_w, grad_b=None):  # noqa: ANN001, ANN205
        src_w, flat_w, flat_wt, src_b, row_b = ctx.saved_tensors
        if not grad_w.is_contiguous() and grad_w.t().is_contiguous():  # F.linear's weight gradient is a transpose
            gw = grad_w.t().reshape(-1).index_select(0, flat_wt)
        else:
            gw = grad_w.reshape(-1).index_select(0, flat_w)
        g = grad_w.new_zeros(ctx.n_theta).index_add_(0, src_w, gw)
        if grad_b is not None:
            g.index_add_(0, src_b, grad_b.index_select(0, row_b))
        grads = [t.view(shape) for t, shape in zip(g.split([math.prod(sh) for sh in ctx.shapes]), ctx.shapes)]
        return (None,) * 7 + tuple(grads)


class EquiLinear(nn.Module):
    """Equivariant linear map ``(mv [..., in_mv, 16], s [..., in_s]) -> (mv [..., out_mv, 16], s [..., out_s])``.

    ``mv_out[o] = sum_i sum_b w[o, i, b] B_b(mv[i])`` over the 9 basis maps, plus
    ``W_s2mv s`` and a bias on the scalar component; ``s_out = W_ss s + W_mv2s <mv>_0 + b``.
    Only the grade-0 component feeds the scalars (the pseudoscalar is not reflection-invariant).

    Computed as one ``F.linear`` of ``[mv.flatten(), s]`` with a fused
    ``[out_mv*16 + out_s, in_mv*16 + in_s]`` matrix and bias scattered from all parameters by one
    autograd node (:class:`_ScatterWeight`): a handful of kernels per layer instead of one per
    coupling, which matters where launches dominate.
    A parent layer may reorder (and zero-pad) the fused matrix's rows and columns with
    :meth:`set_layout` and call :meth:`linear_flat` on inputs in that layout; the parameters and
    :meth:`forward` keep their meaning.
    """

    _PARAMS = ("weight", "s2mv", "mv2s", "s2s", "bias_mv", "bias_s")

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
        self._names = tuple(n for n in self._PARAMS if getattr(self, n) is not None)
        self._has_bias = bias
        self.set_layout()
        self.reset_parameters()

    def set_layout(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        """Order of the rows (outputs) and columns (inputs) of the matrix :meth:`linear_flat` applies.

        ``rows``: indices into the standard outputs ``[mv.flatten() (out_mv*16), s (out_s)]``, ``-1``
        for an output that is always 0; ``cols`` likewise into the standard inputs
        ``[mv.flatten() (in_mv*16), s (in_s)]``, ``-1`` for an input that is ignored. ``None``: standard.
        """
        n_out, n_in = self.out_mv * 16 + self.out_s, self.in_mv * 16 + self.in_s
        std_rows, std_cols = rows is None, cols is None
        rows = torch.arange(n_out) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        cols = torch.arange(n_in) if cols is None else torch.as_tensor(cols, dtype=torch.long)
        if rows.dim() != 1 or cols.dim() != 1 or rows.max() >= n_out or cols.max() >= n_in or rows.min() < -1 or cols.min() < -1:
            raise ValueError(f"layout rows must index {n_out} outputs and cols {n_in} inputs (or be -1)")
        dense = _dense_layout(self.in_mv, self.out_mv, self.in_s, self.out_s, self._has_bias)
        plan = _scatter_plan(dense, n_in, self._has_bias, rows, cols)
        # not in the state dict (derived from the sizes); follow .to(device)
        for name, t in zip(("_src_w", "_flat_w", "_flat_wt", "_src_b", "_row_b"), plan):
            self.register_buffer(name, t.to(self.weight.device), persistent=False)
        self._rows, self._cols = len(rows), len(cols)
        self._standard = std_rows and std_cols

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

    def _scatter(self, plan: list[torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = [getattr(self, n) for n in self._names]
        out = _ScatterWeight.apply(*plan, rows, cols, *params)
        return (out[0], out[1]) if self._has_bias else (out, None)

    def layout_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [rows, cols], bias [rows] | None)`` in the :meth:`set_layout` order."""
        plan = [self._src_w, self._flat_w, self._flat_wt, self._src_b, self._row_b]
        return self._scatter(plan, self._rows, self._cols)

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [out_mv*16 + out_s, in_mv*16 + in_s], bias [out_mv*16 + out_s] | None)`` for ``F.linear``."""
        if self._standard:
            return self.layout_weight()
        n_out, n_in = self.out_mv * 16 + self.out_s, self.in_mv * 16 + self.in_s
        dense = _dense_layout(self.in_mv, self.out_mv, self.in_s, self.out_s, self._has_bias)
        plan = [t.to(self._src_w.device) for t in _scatter_plan(dense, n_in, self._has_bias, torch.arange(n_out), torch.arange(n_in))]
        return self._scatter(plan, n_out, n_in)

    def dense_kernel(self) -> torch.Tensor:
        """The multivector part as one ``[in_mv*16, out_mv*16]`` matrix (``mv.flatten() @ kernel``)."""
        w, _ = self.fused_weight()
        return w[: self.out_mv * 16, : self.in_mv * 16].t()

    def linear_flat(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., cols] -> [..., rows]`` in the :meth:`set_layout` order (standard: ``[mv.flatten(), s]``)."""
        w, b = self.layout_weight()
        return F.linear(x, w, b)

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


_GP_JOIN = torch.cat([torch.tensor(GP.tolist(), dtype=torch.float64).reshape(256, 16),
                      torch.tensor(JOIN.tolist(), dtype=torch.float64).reshape(256, 16)], dim=1)


@functools.lru_cache(maxsize=None)
def _gp_join_cached(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # see _basis_cached
        return _GP_JOIN.to(device=device, dtype=dtype)


def _gp_join_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 32]``: the geometric product (columns 0-15) and join (16-31) tables of ``x_i y_j``."""
    if torch.compiler.is_compiling():
        return _GP_JOIN.to(device=device, dtype=dtype)
    return _gp_join_cached(device, dtype)


class GeometricBilinear(nn.Module):
    """``(mv, s) -> (mv [..., out_mv, 16], s [..., out_s])`` via geometric product and join.

    Four equivariant linear maps make left/right inputs; ``hidden_mv // 2`` channels of
    ``left * right`` (geometric product) and ``hidden_mv // 2`` channels of
    ``join(left, right, reference)`` are concatenated and mapped (with ``s``) by a final
    :class:`EquiLinear`. ``reference`` ``[..., 16]`` (broadcast over the channel axis) fixes
    the join's reflection sign by its e123 component; without it the join channels are
    only equivariant under proper motions.

    Both products come from one GEMM of the outer products ``left_i right_j`` against the
    concatenated ``[256, 32]`` tables (the ``inputs`` map emits all lefts, then all rights); the
    ``output`` map reads the ``[2*half, 32]`` result directly, with zero columns for the
    product not wanted in a channel (:meth:`EquiLinear.set_layout`).
    """

    def __init__(self, in_mv: int, out_mv: int, in_s: int = 0, out_s: int = 0, hidden_mv: int | None = None) -> None:
        super().__init__()
        hidden_mv = hidden_mv or 2 * out_mv
        if hidden_mv < 2 or hidden_mv % 2:
            raise ValueError(f"hidden_mv must be an even number >= 2, got {hidden_mv}")
        self.half = half = hidden_mv // 2
        self.inputs = EquiLinear(in_mv, 4 * half, in_s, 0)
        self.output = EquiLinear(hidden_mv, out_mv, in_s, out_s)
        # standard input channels: gp left, gp right, join left, join right (half each) -> lefts, rights
        order = [*range(0, half), *range(2 * half, 3 * half), *range(half, 2 * half), *range(3 * half, 4 * half)]
        self.inputs.set_layout(rows=torch.tensor([c * 16 + b for c in order for b in range(16)]))
        # output columns: per hidden channel 32 products (gp 16, join 16) of which 16 are used, then s
        blades = torch.arange(16)
        zeros = torch.full((16,), -1)
        cols = [torch.cat([c * 16 + blades, zeros]) for c in range(half)]
        cols += [torch.cat([zeros, c * 16 + blades]) for c in range(half, hidden_mv)]
        cols.append(hidden_mv * 16 + torch.arange(in_s))
        self.output.set_layout(cols=torch.cat(cols))

    def forward(
        self, mv: torch.Tensor, s: torch.Tensor | None = None, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        in_mv, in_s = self.inputs.in_mv, self.inputs.in_s
        if mv.shape[-2:] != (in_mv, 16):
            raise ValueError(f"GeometricBilinear expects multivectors [..., {in_mv}, 16], got {tuple(mv.shape)}")
        if in_s and (s is None or s.shape[-1] != in_s):
            raise ValueError(f"GeometricBilinear expects scalars [..., {in_s}], got {None if s is None else tuple(s.shape)}")
        lead = mv.shape[:-2]
        x = mv.reshape(*lead, in_mv * 16)
        if in_s:
            s = s.expand(*lead, in_s)
            x = torch.cat([x, s], dim=-1)
        left, right = self.inputs.linear_flat(x).unflatten(-1, (2, 2 * self.half, 16)).unbind(-3)
        outer = (left.unsqueeze(-1) * right.unsqueeze(-2)).flatten(-2)  # [..., 2*half, 256]
        prod = outer @ _gp_join_table(outer.device, outer.dtype)  # [..., 2*half, 32]: (gp, join) of every pair
        parts = [prod.flatten(-2)]
        if reference is not None:
            gp, jn = prod.split(self.half, dim=-2)
            parts = [gp.flatten(-2), (jn * reference.unsqueeze(-2)[..., 14:15]).flatten(-2)]
        if in_s:
            parts.append(s)
        y = self.output.linear_flat(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        out_mv, out_s = y.split([self.output.out_mv * 16, self.output.out_s], dim=-1)
        return out_mv.unflatten(-1, (self.output.out_mv, 16)), out_s


@functools.lru_cache(maxsize=None)
def _channel_mean_mask_cached(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # see _basis_cached
        return table("INNER_MASK", device, torch.float64).div(channels).to(dtype)


def _channel_mean_mask(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[16]``: 1/channels on the blades of the invariant inner product, 0 on those with e0."""
    if torch.compiler.is_compiling():
        return table("INNER_MASK", device, dtype) / channels
    return _channel_mean_mask_cached(channels, device, dtype)


class EquiLayerNorm(nn.Module):
    """``mv / sqrt(mean_c <mv_c, mv_c> + eps)`` and a plain layer norm of ``s`` (no parameters).

    ``<x, x>`` is the invariant inner product (blades without e0), so the map is E(3)-equivariant.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, mv: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _channel_mean_mask(mv.shape[-2], mv.device, mv.dtype)  # inner-product blades / C
        sq = (mv * mv * mask).sum((-2, -1), keepdim=True)  # [..., 1, 1]: channel mean of <x, x>
        mv = mv * torch.rsqrt(sq + self.eps)
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
