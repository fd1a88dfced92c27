"""Infinitely connected attention for crystals (Crystalformer, Taniai et al., ICLR 2024).

Every atom ``i`` of the unit cell attends to every atom ``j`` *and all its periodic images*
``j + n`` (``n`` in Z^3, lattice rows ``L``)::

    y_i = 1/Z_i  sum_j sum_n  exp(q_i.k_j / sqrt(d) + phi_ij(n)) (v_j + psi_ij(n))
    phi_ij(n) = -|r_j + n L - r_i|^2 / (2 sigma_i^2)          Gaussian distance decay
    psi_ij(n) = W_psi b(|r_j + n L - r_i|)                     value position encoding

Because the decay makes the lattice sums converge, the attention is a finite one over the
atoms of the cell ("pseudo-finite periodic attention", neural potential summation)::

    y_i = 1/Z_i  sum_j  exp(q_i.k_j / sqrt(d) + alpha_ij) (v_j + beta_ij)
    alpha_ij = log sum_n exp(phi_ij(n))                        (potential summed over the lattice)
    beta_ij  = sum_n softmax_n(phi_ij(n)) psi_ij(n)

Each query/head has its own width ``sigma_ih`` computed from its query vector (see
:class:`PeriodicGaussianAttention`). The lattice sums are truncated at a radius of
``cutoff_sigmas * sigma_ih`` (the paper's 3.5 sigma): the terms left out weigh less than
``exp(-cutoff_sigmas^2 / 2)`` times the nearest one. Since the truncation is a sphere in
space (not a range of cells), the result does not depend on the cell used to describe the
crystal: a supercell, a reduced or a skewed cell give the same sums, exactly.

This module holds the plain-torch reference path: one periodic neighbour search
(:func:`lattice_terms`, shared by all blocks), segment sums over the (i, j, n) terms and a
segment softmax over the atom pairs. No Python loop over atoms, images or crystals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equiformer.graph.edges import edge_vectors
from equiformer.graph.radius import radius_graph_pbc
from equiformer.nn.scatter import segment_softmax, segment_sum

__all__ = [
    "BACKENDS",
    "LatticeTerms",
    "PeriodicGaussianAttention",
    "distance_basis",
    "gaussian_lattice_sums",
    "lattice_terms",
]


#: lattice-sum implementations: plain torch (reference) or the fused Triton kernels
#: (:mod:`equiformer.nn.periodic_attention_triton`, used where they can run, else torch)
BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class LatticeTerms:
    """The (i, j, n) terms of truncated lattice sums of a batch, grouped by atom pair (i, j).

    Attributes:
        center: [E] long, the query atom ``i`` of each term.
        neighbor: [E] long, the key atom ``j`` (the image ``j + n`` lies within ``radius`` of ``i``).
        dist2: [E] squared distance ``|r_j + n L - r_i|^2`` (Å^2), differentiable w.r.t. pos and cell.
        dist: [E] distance (Å); 0 for the term ``i = j, n = 0`` (with a zero gradient there).
        pair: [E] long, index of the term's pair in ``pair_center`` / ``pair_neighbor``; terms are
            sorted by pair.
        pair_center: [P] long, ``i`` of each pair (pairs sorted by ``i``, then ``j``).
        pair_neighbor: [P] long, ``j`` of each pair.
        pair_offsets: [P + 1] long, the terms of pair p are ``pair_offsets[p]:pair_offsets[p + 1]``.
        radius: the search radius (Å); every image closer than it is a term.
        num_nodes: N.
    """

    center: Tensor
    neighbor: Tensor
    dist2: Tensor
    dist: Tensor
    pair: Tensor
    pair_center: Tensor
    pair_neighbor: Tensor
    pair_offsets: Tensor
    radius: float
    num_nodes: int

    @property
    def num_terms(self) -> int:
        return int(self.center.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.pair_center.numel())


def lattice_terms(pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, radius: float) -> LatticeTerms:
    """Every periodic image ``j + n`` within ``radius`` of every atom ``i`` of the same structure.

    Includes ``i = j`` (the atom itself at ``n = 0``, and its own images at ``n != 0``). Pairs (i, j)
    with no image inside the radius are absent (their lattice sums are 0 after truncation).

    Args:
        pos: [N, 3] Cartesian positions (Å).
        cell: [B, 3, 3] lattice vectors as rows (Å).
        pbc: [B, 3] bool periodic directions (non-periodic directions get no images).
        batch: [N] long structure index of each atom.
        radius: search radius (Å).
    Returns:
        :class:`LatticeTerms`.
    """
    n = pos.shape[0]
    edge_index, shift = radius_graph_pbc(pos.detach(), cell.detach(), pbc, radius, batch)
    self_index = torch.arange(n, device=pos.device)
    neighbor = torch.cat([edge_index[0], self_index])
    center = torch.cat([edge_index[1], self_index])
    shift = torch.cat([shift, shift.new_zeros(n, 3)])
    vec = edge_vectors(pos, torch.stack([neighbor, center]), shift, cell, batch)
    dist2 = (vec * vec).sum(-1)
    positive = dist2 > 0
    safe = torch.where(positive, dist2, torch.ones_like(dist2))  # sqrt'(0) is infinite: keep 0 out of it
    dist = torch.where(positive, torch.sqrt(safe), torch.zeros_like(dist2))
    keys, pair = torch.unique(center * n + neighbor, sorted=True, return_inverse=True)
    order = torch.argsort(pair, stable=True)  # terms of one pair contiguous (CSR for fused kernels)
    pair = pair[order]
    counts = torch.bincount(pair, minlength=keys.numel())
    offsets = torch.zeros(keys.numel() + 1, dtype=torch.long, device=pos.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return LatticeTerms(
        center=center[order],
        neighbor=neighbor[order],
        dist2=dist2[order],
        dist=dist[order],
        pair=pair,
        pair_center=torch.div(keys, n, rounding_mode="floor"),
        pair_neighbor=keys % n,
        pair_offsets=offsets,
        radius=float(radius),
        num_nodes=n,
    )


def distance_basis(dist: Tensor, num_basis: int, max_dist: float, width_scale: float = 1.0) -> Tensor:
    """Gaussian basis of distances: ``b_k(r) = exp(-(r - mu_k)^2 / (2 s^2))``, ``mu_k = k m / K``
    (k = 1..K), ``s = width_scale * m / K`` (the paper's value position encoding).

    Args:
        dist: [E] distances (Å).
        num_basis: K.
        max_dist: m (Å), the last centre.
        width_scale: width in units of the centre spacing.
    Returns:
        [E, K] in dist's dtype.
    """
    spacing = max_dist / num_basis
    centers = torch.arange(1, num_basis + 1, device=dist.device, dtype=dist.dtype) * spacing
    z = (dist.unsqueeze(-1) - centers) / (width_scale * spacing)
    return torch.exp(-0.5 * z * z)


def gaussian_lattice_sums(
    terms: LatticeTerms, inv_two_sigma2: Tensor, cutoff_sigmas: float, psi: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pair potentials of the truncated lattice sums, per head.

    ``S_ij = sum_n w_ij(n)``, ``w_ij(n) = exp(-|r_j + n L - r_i|^2 / (2 sigma_i^2))`` over the images
    closer than ``cutoff_sigmas * sigma_i``; ``alpha_ij = log S_ij``;
    ``beta_ij = sum_n w_ij(n) psi_ij(n) / S_ij``.

    Args:
        terms: from :func:`lattice_terms` (its radius must reach ``cutoff_sigmas * max sigma``).
        inv_two_sigma2: [N, H] ``1 / (2 sigma_ih^2)`` (Å^-2) of each query atom and head.
        cutoff_sigmas: truncation radius in units of each query's sigma.
        psi: optional [E, H, D] value position encoding of each term.
    Returns:
        (alpha [P, H] (-inf where every term is truncated), S [P, H], beta [P, H, D] or None).
    """
    phi = -terms.dist2.unsqueeze(-1) * inv_two_sigma2.index_select(0, terms.center)  # [E, H]
    keep = phi > -0.5 * cutoff_sigmas * cutoff_sigmas
    weight = torch.where(keep, torch.exp(phi), torch.zeros_like(phi))  # in [exp(-c^2/2), 1]: no overflow
    total = segment_sum(weight, terms.pair, terms.num_pairs)  # [P, H]
    tiny = torch.finfo(total.dtype).tiny
    alpha = torch.where(total > 0, torch.log(total.clamp_min(tiny)), torch.full_like(total, -math.inf))
    beta = None
    if psi is not None:
        weighted = segment_sum(weight.unsqueeze(-1) * psi, terms.pair, terms.num_pairs)  # [P, H, D]
        beta = weighted / total.clamp_min(tiny).unsqueeze(-1)
    return alpha, total, beta


class PeriodicGaussianAttention(nn.Module):
    """Multi-head infinitely connected attention with Gaussian distance decay (Crystalformer).

    The width of head ``h`` for query atom ``i`` follows the current query vector (paper's
    parametrisation)::

        a_ih = (q_ih . w_h + shift) * scale                 # standardised, see below
        f_ih = (1 - b) ELU(gamma a_ih / (1 - b)) + 1        # f > b
        sigma_ih = r0 / sqrt(f_ih)                          # 0 < sigma < r0 / sqrt(b)

    with ``r0 = sigma_scale`` (1.4 Å), ``b = sigma_lower_bound`` (0.5), ``gamma = sigma_slope``
    (0.1), so sigma starts near r0 and never exceeds ``r0 / sqrt(b)`` (1.98 Å); the lattice
    sums are then truncated within ``cutoff_sigmas * r0 / sqrt(b)`` (6.93 Å) at most.

    ``shift``/``scale`` standardise ``q.w`` with its mean and standard deviation over the first
    training batch (as the paper's code does, once, at the first training step); they are
    buffers saved with the model. Before that calibration, and with ``normalize_sigma=False``,
    they are the identity.

    The value position encoding ``psi_h(r) = W_h b(r)`` maps a Gaussian basis of the distance
    (``num_basis`` centres up to ``basis_max`` Å, :func:`distance_basis`) through a per-head
    linear map without bias.

    Args:
        dim: model width C (= heads x head width).
        num_heads: H.
        sigma_scale, sigma_lower_bound, sigma_slope: r0 (Å), b, gamma above.
        cutoff_sigmas: truncation radius in units of sigma (the paper's adaptive 3.5 sigma).
        num_basis, basis_max, basis_width_scale: the distance basis of the value position
            encoding (``num_basis=0`` disables it).
        normalize_sigma: standardise ``q.w`` with first-batch statistics.
        backend: "torch" (reference) or "triton" (fused kernels on CUDA when the distances need
            no gradient; the torch path otherwise).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sigma_scale: float = 1.4,
        sigma_lower_bound: float = 0.5,
        sigma_slope: float = 0.1,
        cutoff_sigmas: float = 3.5,
        num_basis: int = 64,
        basis_max: float = 14.0,
        basis_width_scale: float = 1.0,
        normalize_sigma: bool = True,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 < sigma_lower_bound < 1.0:
            raise ValueError(f"sigma_lower_bound must be in (0, 1), got {sigma_lower_bound}")
        if sigma_scale <= 0 or cutoff_sigmas <= 0:
            raise ValueError(f"sigma_scale and cutoff_sigmas must be > 0, got {sigma_scale}, {cutoff_sigmas}")
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.dim // self.num_heads
        self.sigma_scale = float(sigma_scale)
        self.sigma_lower_bound = float(sigma_lower_bound)
        self.sigma_slope = float(sigma_slope)
        self.cutoff_sigmas = float(cutoff_sigmas)
        self.num_basis = int(num_basis)
        self.basis_max = float(basis_max)
        self.basis_width_scale = float(basis_width_scale)
        self.normalize_sigma = bool(normalize_sigma)
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.sigma_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.value_pe = (
            nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.num_basis)) if self.num_basis > 0 else None
        )
        # (shift, scale) of q.w; scale 0 = not calibrated yet
        self.register_buffer("sigma_stats", torch.zeros(2))
        self._calibrated = False
        self.register_load_state_dict_post_hook(_refresh_calibration_flag)
        self.reset_parameters()

    @property
    def max_sigma(self) -> float:
        """Upper bound of sigma (Å): ``r0 / sqrt(b)``."""
        return self.sigma_scale / math.sqrt(self.sigma_lower_bound)

    @property
    def radius(self) -> float:
        """Largest truncation radius (Å) any query can use: ``cutoff_sigmas * max_sigma``."""
        return self.cutoff_sigmas * self.max_sigma

    @property
    def calibrated(self) -> bool:
        return self._calibrated

    def reset_parameters(self) -> None:
        """Xavier-uniform projections with zero biases, N(0, 1/head_dim) sigma weights, and
        value-encoding maps uniform in +-sqrt(6 / (C + K)) / sqrt(K) (the paper's code)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.sigma_weight, 0.0, self.head_dim**-0.5)
        if self.value_pe is not None:
            bound = math.sqrt(6.0 / (self.dim + self.num_basis)) / math.sqrt(self.num_basis)
            nn.init.uniform_(self.value_pe, -bound, bound)
        self.sigma_stats.zero_()
        self._calibrated = False

    # ------------------------------------------------------------------ widths

    def _inv_two_sigma2(self, q: Tensor, calibrate: bool) -> Tensor:
        """q [N, H, d] -> 1 / (2 sigma^2) [N, H] (Å^-2); sets the statistics when ``calibrate`` and not yet set."""
        a = (q * self.sigma_weight).sum(-1)
        if self.normalize_sigma:
            if calibrate and not self._calibrated and a.numel() > 1:
                with torch.no_grad():
                    std = a.std()
                    if bool(torch.isfinite(std)) and float(std) > 0:
                        self.sigma_stats.copy_(torch.stack([-a.mean(), 1.0 / std]).to(self.sigma_stats))
                        self._calibrated = True
            if self._calibrated:
                stats = self.sigma_stats.to(a.dtype)
                a = (a + stats[0]) * stats[1]
        b = self.sigma_lower_bound
        f = (1.0 - b) * F.elu(a * (self.sigma_slope / (1.0 - b))) + 1.0
        return f / (2.0 * self.sigma_scale**2)

    def sigma(self, x: Tensor) -> Tensor:
        """Gaussian widths sigma [N, H] (Å) of each atom's queries for features x [N, C] (no calibration)."""
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        return torch.rsqrt(2.0 * self._inv_two_sigma2(q, calibrate=False))

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, terms: LatticeTerms, basis: Tensor | None = None) -> Tensor:
        """x [N, C] atom features -> [N, C].

        Args:
            x: features of the atoms of the unit cells.
            terms: lattice terms whose radius is at least :attr:`radius`.
            basis: [E, K] distance basis of the terms (:func:`distance_basis` with this module's
                basis settings), shared by the blocks; computed here when not given.
        """
        if terms.radius < self.radius * (1 - 1e-12):
            raise ValueError(f"lattice terms searched within {terms.radius:.3f} Å; this attention needs "
                             f"{self.radius:.3f} Å (cutoff_sigmas x max sigma)")
        n, H, d = x.shape[0], self.num_heads, self.head_dim
        q = self.q_proj(x).view(n, H, d)
        k = self.k_proj(x).view(n, H, d)
        v = self.v_proj(x).view(n, H, d)
        inv_two_sigma2 = self._inv_two_sigma2(q, calibrate=self.training)
        if self._use_triton(terms, x):
            from equiformer.nn.periodic_attention_triton import gaussian_lattice_sums_triton

            alpha, _, bbar = gaussian_lattice_sums_triton(terms, inv_two_sigma2, self.cutoff_sigmas, self.num_basis,
                                                          self.basis_max, self.basis_width_scale)
            beta = torch.einsum("phk,hdk->phd", bbar, self.value_pe)
        else:
            psi = None
            if self.value_pe is not None:
                if basis is None:
                    basis = distance_basis(terms.dist, self.num_basis, self.basis_max, self.basis_width_scale)
                psi = torch.einsum("ek,hdk->ehd", basis.to(x.dtype), self.value_pe)
            alpha, _, beta = gaussian_lattice_sums(terms, inv_two_sigma2, self.cutoff_sigmas, psi)
        pi, pj = terms.pair_center, terms.pair_neighbor
        logits = (q.index_select(0, pi) * k.index_select(0, pj)).sum(-1) / math.sqrt(d) + alpha  # [P, H]
        attn = segment_softmax(logits, pi, n)  # every atom has its own n = 0 term: no empty row
        values = v.index_select(0, pj)
        if beta is not None:
            values = values + beta
        out = segment_sum(attn.unsqueeze(-1) * values, pi, n)  # [N, H, d]
        return self.out_proj(out.reshape(n, self.dim))

    def _use_triton(self, terms: LatticeTerms, x: Tensor) -> bool:
        if self.backend != "triton" or self.value_pe is None or terms.dist2.requires_grad:
            return False
        from equiformer.nn.periodic_attention_triton import triton_available

        return triton_available(x.device)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sigma_scale={self.sigma_scale}, "
                f"sigma_lower_bound={self.sigma_lower_bound}, cutoff_sigmas={self.cutoff_sigmas}, "
                f"num_basis={self.num_basis}, backend={self.backend!r}")


def _refresh_calibration_flag(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: calibrated iff the loaded scale is set."""
    module._calibrated = bool(module.sigma_stats[1] > 0)
