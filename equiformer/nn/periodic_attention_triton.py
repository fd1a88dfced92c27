"""Fused Triton kernels for Crystalformer's truncated Gaussian lattice sums (optional backend).

For every atom pair ``p = (i, j)`` and head ``h`` one program walks over the pair's periodic
images (the terms of :class:`~equiformer.nn.periodic_attention.LatticeTerms`, contiguous per
pair) and accumulates, without materialising per-image tensors::

    S_ph    = sum_n w_n,            w_n = exp(-d_n^2 / (2 sigma_ih^2))  if d_n < cutoff_sigmas * sigma_ih
    Bbar_ph = sum_n w_n b(d_n) / S_ph                         (b: the K-Gaussian distance basis)

so that ``alpha = log S`` and ``beta_h = W_h Bbar_h`` (one batched matmul outside the kernel,
where autograd handles ``W``). The backward kernel recomputes the weights and returns the
gradient with respect to ``1 / (2 sigma^2)``; gradients with respect to positions are not
implemented, so :class:`~equiformer.nn.periodic_attention.PeriodicGaussianAttention` uses the
plain-torch path whenever the distances require a gradient.

The plain-torch path (:func:`~equiformer.nn.periodic_attention.gaussian_lattice_sums`) is the
reference; ``tests/test_crystalformer.py`` checks the two against each other on a GPU (marker
``gpu``) and, where Triton is installed, on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from equiformer.nn.scatter import segment_sum

try:  # optional dependency: Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "gaussian_lattice_sums_triton", "triton_available"]

#: terms loaded per step of a program's loop over one pair's images
BLOCK_TERMS = 32


def triton_available(device: torch.device) -> bool:
    """True when the fused kernels can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if HAS_TRITON:

    @triton.jit
    def _lattice_sums_fwd(
        dist2_ptr, dist_ptr, offsets_ptr, center_ptr, inv_ptr, param_ptr, s_ptr, bbar_ptr,
        H, K,
        HP: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, USE_DOT: tl.constexpr,
    ):
        p = tl.program_id(0).to(tl.int64)
        start = tl.load(offsets_ptr + p)
        end = tl.load(offsets_ptr + p + 1)
        i = tl.load(center_ptr + p)
        threshold = tl.load(param_ptr)  # c^2 / 2, basis spacing and 1 / width, in the working dtype
        spacing = tl.load(param_ptr + 1)
        inv_width = tl.load(param_ptr + 2)
        hs = tl.arange(0, HP)
        ks = tl.arange(0, KP)
        hmask = hs < H
        kmask = ks < K
        inv = tl.load(inv_ptr + i * H + hs, mask=hmask, other=0.0)  # [HP]
        mu = (ks + 1).to(inv.dtype) * spacing  # [KP]
        s_acc = tl.zeros((HP,), dtype=inv.dtype)
        b_acc = tl.zeros((HP, KP), dtype=inv.dtype)
        for e0 in range(start, end, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            emask = es < end
            d2 = tl.load(dist2_ptr + es, mask=emask, other=0.0)
            d = tl.load(dist_ptr + es, mask=emask, other=0.0)
            phi = -d2[:, None] * inv[None, :]  # [BE, HP]
            keep = (phi > -threshold) & emask[:, None] & hmask[None, :]
            w = tl.where(keep, tl.exp(phi), 0.0)
            s_acc += tl.sum(w, axis=0)
            z = (d[:, None] - mu[None, :]) * inv_width  # [BE, KP]
            b = tl.where(emask[:, None] & kmask[None, :], tl.exp(-0.5 * z * z), 0.0)
            if USE_DOT:
                b_acc += tl.dot(tl.trans(w), b, input_precision="ieee")  # [HP, KP]
            else:  # float64: a broadcast reduction (fp64 tensor-core dots are not available everywhere)
                b_acc += tl.sum(w[:, :, None] * b[:, None, :], axis=0)
        safe = tl.where(s_acc > 0, s_acc, 1.0)
        tl.store(s_ptr + p * H + hs, s_acc, mask=hmask)
        tl.store(bbar_ptr + p * H * K + hs[:, None] * K + ks[None, :], b_acc / safe[:, None],
                 mask=hmask[:, None] & kmask[None, :])

    @triton.jit
    def _lattice_sums_bwd(
        dist2_ptr, dist_ptr, offsets_ptr, center_ptr, inv_ptr, param_ptr, s_ptr, bbar_ptr, gs_ptr, gb_ptr, ginv_ptr,
        H, K,
        HP: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, USE_DOT: tl.constexpr,
    ):
        p = tl.program_id(0).to(tl.int64)
        start = tl.load(offsets_ptr + p)
        end = tl.load(offsets_ptr + p + 1)
        i = tl.load(center_ptr + p)
        threshold = tl.load(param_ptr)  # c^2 / 2, basis spacing and 1 / width, in the working dtype
        spacing = tl.load(param_ptr + 1)
        inv_width = tl.load(param_ptr + 2)
        hs = tl.arange(0, HP)
        ks = tl.arange(0, KP)
        hmask = hs < H
        kmask = ks < K
        hk = p * H * K + hs[:, None] * K + ks[None, :]
        hkmask = hmask[:, None] & kmask[None, :]
        inv = tl.load(inv_ptr + i * H + hs, mask=hmask, other=0.0)
        s = tl.load(s_ptr + p * H + hs, mask=hmask, other=0.0)
        gs = tl.load(gs_ptr + p * H + hs, mask=hmask, other=0.0)
        bbar = tl.load(bbar_ptr + hk, mask=hkmask, other=0.0)  # [HP, KP]
        gb = tl.load(gb_ptr + hk, mask=hkmask, other=0.0)
        safe = tl.where(s > 0, s, 1.0)
        # dL/dw_n = gS + sum_k gB_k (b_k(d_n) - Bbar_k) / S
        base = gs - tl.sum(gb * bbar, axis=1) / safe  # [HP]
        gbs = gb / safe[:, None]  # [HP, KP]
        mu = (ks + 1).to(inv.dtype) * spacing
        acc = tl.zeros((HP,), dtype=inv.dtype)
        for e0 in range(start, end, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            emask = es < end
            d2 = tl.load(dist2_ptr + es, mask=emask, other=0.0)
            d = tl.load(dist_ptr + es, mask=emask, other=0.0)
            phi = -d2[:, None] * inv[None, :]
            keep = (phi > -threshold) & emask[:, None] & hmask[None, :]
            w = tl.where(keep, tl.exp(phi), 0.0)  # [BE, HP]
            z = (d[:, None] - mu[None, :]) * inv_width
            b = tl.where(emask[:, None] & kmask[None, :], tl.exp(-0.5 * z * z), 0.0)  # [BE, KP]
            if USE_DOT:
                dw = base[None, :] + tl.dot(b, tl.trans(gbs), input_precision="ieee")  # [BE, HP]
            else:
                dw = base[None, :] + tl.sum(b[:, None, :] * gbs[None, :, :], axis=2)
            acc += tl.sum(dw * w * (-d2[:, None]), axis=0)  # dw/dinv = -d^2 w
        tl.store(ginv_ptr + p * H + hs, acc, mask=hmask)


def _launch_args(inv: Tensor, cutoff_sigmas: float, num_basis: int, max_dist: float,
                 width_scale: float) -> tuple[Tensor, dict[str, Any]]:
    """The kernels' parameter tensor (threshold, spacing, 1 / width) and launch keywords."""
    spacing = max_dist / num_basis
    params = torch.tensor([0.5 * cutoff_sigmas * cutoff_sigmas, spacing, 1.0 / (width_scale * spacing)],
                          dtype=inv.dtype, device=inv.device)
    H = inv.shape[1]
    return params, {
        "H": H,
        "K": num_basis,
        "HP": max(16, triton.next_power_of_2(H)),
        "KP": max(16, triton.next_power_of_2(num_basis)),
        "BLOCK_E": BLOCK_TERMS,
        "USE_DOT": inv.dtype != torch.float64,
    }


class _GaussianLatticeSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, inv: Tensor, terms: Any, cutoff_sigmas: float, num_basis: int, max_dist: float,
                width_scale: float) -> tuple[Tensor, Tensor]:
        inv = inv.contiguous()
        P, H = terms.num_pairs, inv.shape[1]
        dist2 = terms.dist2.detach().to(inv.dtype).contiguous()
        dist = terms.dist.detach().to(inv.dtype).contiguous()
        total = inv.new_empty(P, H)
        bbar = inv.new_empty(P, H, num_basis)
        params, args = _launch_args(inv, cutoff_sigmas, num_basis, max_dist, width_scale)
        if P:
            _lattice_sums_fwd[(P,)](dist2, dist, terms.pair_offsets, terms.pair_center, inv, params, total, bbar,
                                    **args)
        ctx.save_for_backward(inv, dist2, dist, terms.pair_offsets, terms.pair_center, params, total, bbar)
        ctx.args = args
        return total, bbar

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor | None, grad_bbar: Tensor | None) -> tuple[Any, ...]:
        inv, dist2, dist, offsets, center, params, total, bbar = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        grad_total = torch.zeros_like(total) if grad_total is None else grad_total.contiguous()
        grad_bbar = torch.zeros_like(bbar) if grad_bbar is None else grad_bbar.contiguous()
        grad_pair = torch.empty_like(total)
        if total.shape[0]:
            _lattice_sums_bwd[(total.shape[0],)](dist2, dist, offsets, center, inv, params, total, bbar,
                                                 grad_total, grad_bbar, grad_pair, **ctx.args)
        return segment_sum(grad_pair, center, inv.shape[0]), None, None, None, None, None


def gaussian_lattice_sums_triton(
    terms: Any, inv_two_sigma2: Tensor, cutoff_sigmas: float, num_basis: int, max_dist: float,
    width_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused version of the lattice sums: ``(alpha [P, H], S [P, H], Bbar [P, H, K])``.

    ``alpha = log S`` (-inf where every image is truncated); ``Bbar`` is the weight-averaged
    distance basis, so the value encoding is ``beta = einsum("phk,hdk->phd", Bbar, W)``.
    Differentiable with respect to ``inv_two_sigma2`` [N, H] only (the distances are constants).

    Raises:
        RuntimeError: when Triton cannot run on the tensors' device (:func:`triton_available`).
    """
    if not triton_available(inv_two_sigma2.device):
        raise RuntimeError("the Triton lattice-sum kernels need Triton and a CUDA device "
                           "(or TRITON_INTERPRET=1); use the plain-torch path instead")
    total, bbar = _GaussianLatticeSums.apply(inv_two_sigma2, terms, float(cutoff_sigmas), int(num_basis),
                                             float(max_dist), float(width_scale))
    tiny = torch.finfo(total.dtype).tiny
    alpha = torch.where(total > 0, torch.log(total.clamp_min(tiny)), torch.full_like(total, -math.inf))
    return alpha, total, bbar
