"""Crystalformer: a Transformer encoder of crystals with infinitely connected attention.

Taniai, Igarashi, Suzuki, Chiba, Saito, Ushiku, Ono, "Crystalformer: Infinitely Connected
Attention for Periodic Structure Encoding", ICLR 2024 (https://openreview.net/forum?id=fxQiecl9HB).

Architecture (the paper's defaults, ``preset="default"``)::

    x_i = E[z_i]                                    atom-type embedding, 128 channels
    4 x  x = x + Attn(x);  x = x + FFN(x)           no layer norm; T-Fixup initialisation
         Attn: infinitely connected attention (equiformer.nn.periodic_attention), 8 heads
         FFN: Linear(128, 512) - ReLU - Linear(512, 128)
    h = mean_i x_i                                  intensive readout (mean pooling)
    y = Linear(128, T)(ReLU(Linear(128, 128)(h)))   {"y": [B, T]}

853,505 parameters for one target (7 blocks: 1,471,745), 29.4% of Matformer's 2.9M, as the
paper reports. The model reads only interatomic distances between periodic images, so its
outputs are invariant under rotations, reflections, translations, atom permutations and any
choice of unit cell (supercells, reduced or skewed cells), exactly up to the truncation of
the lattice sums (weights below ``exp(-cutoff_sigmas^2 / 2)`` of the nearest image).

Input: a PyG ``Data``/``Batch`` of the data contract (``z`` [N], ``pos`` [N, 3] Å, ``cell``
[B, 3, 3] Å, ``pbc`` [B, 3], ``batch`` [N]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from equiformer.data.contract import CHEMICAL_SYMBOLS
from equiformer.graph.pbc import as_batched_cell_pbc
from equiformer.nn.periodic_attention import LatticeTerms, PeriodicGaussianAttention, distance_basis, lattice_terms
from equiformer.nn.scatter import segment_mean

__all__ = ["Crystalformer", "CrystalformerBlock", "PRESETS"]

_DEFAULT: dict[str, Any] = {
    "num_blocks": 4,
    "dim": 128,
    "num_heads": 8,
    "ff_dim": 512,
    "head_hidden": 128,
    "num_elements": 98,
    "sigma_scale": 1.4,
    "sigma_lower_bound": 0.5,
    "sigma_slope": 0.1,
    "cutoff_sigmas": 3.5,
    "num_basis": 64,
    "basis_max": 14.0,
    "basis_width_scale": 1.0,
    "normalize_sigma": True,
    "norm": "none",
    "t_fixup": True,
    "attention_backend": "torch",
}
#: named architectures; explicit keyword arguments override a preset's entries
PRESETS: dict[str, dict[str, Any]] = {
    "default": _DEFAULT,  # the paper's 4-block model (MP, JARVIS)
    "7_blocks": {**_DEFAULT, "num_blocks": 7},  # the paper's deeper variant
    "small": {**_DEFAULT, "num_blocks": 2, "dim": 32, "num_heads": 4, "ff_dim": 64, "head_hidden": 32,
              "num_basis": 16},  # tests and smoke runs
}
_NORMS = ("none", "post", "pre")


class CrystalformerBlock(nn.Module):
    """One encoder block: infinitely connected attention and a ReLU feed-forward network, with
    residual connections; ``norm`` = "none" (paper, with T-Fixup), "post" or "pre" layer norm."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, norm: str = "none", **attention: Any) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {_NORMS}")
        self.norm = norm
        self.attn = PeriodicGaussianAttention(dim, num_heads, **attention)
        self.ff1 = nn.Linear(dim, ff_dim)
        self.ff2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim) if norm != "none" else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if norm != "none" else nn.Identity()
        for lin in (self.ff1, self.ff2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def t_fixup_(self, num_blocks: int) -> None:
        """T-Fixup (Huang et al., 2020): scale the value, output and feed-forward weights by 0.67 N^-1/4."""
        factor = 0.67 * num_blocks ** (-0.25)
        with torch.no_grad():
            for w in (self.attn.v_proj.weight, self.attn.out_proj.weight, self.ff1.weight, self.ff2.weight):
                w.mul_(factor)

    def _ff(self, x: Tensor) -> Tensor:
        return self.ff2(torch.relu(self.ff1(x)))

    def forward(self, x: Tensor, terms: LatticeTerms, basis: Tensor | None) -> Tensor:
        """x [N, C] -> [N, C]."""
        if self.norm == "pre":
            x = x + self.attn(self.norm1(x), terms, basis)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.attn(x, terms, basis))
        return self.norm2(x + self._ff(x))


class Crystalformer(nn.Module):
    """Crystalformer (Taniai et al., ICLR 2024) for graph-level properties of crystals.

    Every argument is JSON-serialisable and stored in ``self.config``; arguments left ``None``
    come from ``preset`` (:data:`PRESETS`).

    Args:
        preset: ``"default"`` (the paper's 4 blocks), ``"7_blocks"`` or ``"small"``.
        num_targets: T, the width of ``y``.
        num_blocks: encoder blocks.
        dim: model width (128); ``num_heads`` heads of ``dim / num_heads`` channels.
        ff_dim: hidden width of the feed-forward networks (512).
        head_hidden: hidden width of the output MLP (128).
        num_elements: atom types (atomic numbers 1..num_elements; the paper's 98).
        sigma_scale, sigma_lower_bound, sigma_slope: the Gaussian width parametrisation
            (r0 = 1.4 Å, b = 0.5, gamma = 0.1; sigma < r0 / sqrt(b)), see
            :class:`~equiformer.nn.periodic_attention.PeriodicGaussianAttention`.
        cutoff_sigmas: the lattice sums keep images within this many sigma (paper: 3.5).
        num_basis, basis_max, basis_width_scale: Gaussian distance basis of the value
            position encoding (64 centres up to 14 Å, width = spacing).
        normalize_sigma: standardise the width logits with first-training-batch statistics.
        norm: "none" (paper), "post" or "pre" layer norm in the blocks.
        t_fixup: T-Fixup initialisation (paper; meant for ``norm="none"``).
        attention_backend: "torch" (reference) or "triton" (fused lattice-sum kernels on CUDA,
            :mod:`equiformer.nn.periodic_attention_triton`; same parameters and results).
    """

    def __init__(
        self,
        preset: str = "default",
        num_targets: int = 1,
        num_blocks: int | None = None,
        dim: int | None = None,
        num_heads: int | None = None,
        ff_dim: int | None = None,
        head_hidden: int | None = None,
        num_elements: int | None = None,
        sigma_scale: float | None = None,
        sigma_lower_bound: float | None = None,
        sigma_slope: float | None = None,
        cutoff_sigmas: float | None = None,
        num_basis: int | None = None,
        basis_max: float | None = None,
        basis_width_scale: float | None = None,
        normalize_sigma: bool | None = None,
        norm: str | None = None,
        t_fixup: bool | None = None,
        attention_backend: str | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown Crystalformer preset {preset!r}; choose one of {sorted(PRESETS)}")
        cfg: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        for key, value in PRESETS[preset].items():
            if cfg.get(key) is None:
                cfg[key] = value
        self.config: dict[str, Any] = cfg
        if int(num_targets) < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")
        self.num_targets = int(num_targets)
        self.num_elements = int(cfg["num_elements"])
        self.num_basis = int(cfg["num_basis"])
        self.basis_max = float(cfg["basis_max"])
        self.basis_width_scale = float(cfg["basis_width_scale"])
        dim, nblocks = int(cfg["dim"]), int(cfg["num_blocks"])
        attention = {
            "sigma_scale": float(cfg["sigma_scale"]),
            "sigma_lower_bound": float(cfg["sigma_lower_bound"]),
            "sigma_slope": float(cfg["sigma_slope"]),
            "cutoff_sigmas": float(cfg["cutoff_sigmas"]),
            "num_basis": self.num_basis,
            "basis_max": self.basis_max,
            "basis_width_scale": self.basis_width_scale,
            "normalize_sigma": bool(cfg["normalize_sigma"]),
            "backend": str(cfg["attention_backend"]),
        }
        self.embedding = nn.Embedding(self.num_elements, dim)  # row z - 1
        std = dim**-0.5 * ((9 * nblocks) ** -0.25 if cfg["t_fixup"] else 1.0)
        nn.init.normal_(self.embedding.weight, 0.0, std)
        self.blocks = nn.ModuleList(
            CrystalformerBlock(dim, int(cfg["num_heads"]), int(cfg["ff_dim"]), str(cfg["norm"]), **attention)
            for _ in range(nblocks)
        )
        if cfg["t_fixup"]:
            for block in self.blocks:
                block.t_fixup_(nblocks)
        hidden = int(cfg["head_hidden"])
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, self.num_targets))

    # ------------------------------------------------------------------ geometry

    @property
    def radius(self) -> float:
        """Search radius of the lattice sums (Å): the largest any block may need."""
        return max(block.attn.radius for block in self.blocks)

    @property
    def calibrated(self) -> bool:
        """True once every block's sigma statistics are set (first training batch or :meth:`calibrate`)."""
        return all(block.attn.calibrated or not block.attn.normalize_sigma for block in self.blocks)

    def _inputs(self, data: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        z = getattr(data, "z", None)
        pos = getattr(data, "pos", None)
        if z is None or pos is None:
            raise ValueError("Crystalformer: the structure needs 'z' and 'pos' fields (the data contract)")
        cell = getattr(data, "cell", None)
        pbc = getattr(data, "pbc", None)
        if cell is None or pbc is None:
            raise ValueError("Crystalformer: the structure has no 'cell'/'pbc'; it is a model of periodic crystals")
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
            num_graphs = 1
        else:
            num_graphs = int(getattr(data, "num_graphs", 0) or (int(batch.max()) + 1 if batch.numel() else 1))
        cell, pbc = as_batched_cell_pbc(cell, pbc, num_graphs, pos.device, pos.dtype)
        if not torch.compiler.is_compiling() and z.numel():
            lo, hi = int(z.min()), int(z.max())
            if lo < 1 or hi > self.num_elements:
                bad = lo if lo < 1 else hi
                name = CHEMICAL_SYMBOLS[bad] if 0 <= bad < len(CHEMICAL_SYMBOLS) else str(bad)
                raise ValueError(f"Crystalformer: atomic number {bad} ({name}) is outside the model's "
                                 f"elements 1..{self.num_elements}")
        return z, pos, cell.to(pos.dtype), pbc, batch, num_graphs

    def lattice(self, data: Any) -> LatticeTerms:
        """The lattice terms (all images within :attr:`radius`) of a structure or batch."""
        _, pos, cell, pbc, batch, _ = self._inputs(data)
        return lattice_terms(pos, cell, pbc, batch, self.radius)

    # ------------------------------------------------------------------ forward

    def encode(self, data: Any) -> Tensor:
        """Per-atom features [N, dim] after the last block (invariant; equal for equivalent atoms)."""
        z, pos, cell, pbc, batch, _ = self._inputs(data)
        terms = lattice_terms(pos, cell, pbc, batch, self.radius)
        x = self.embedding(z - 1).to(pos.dtype)
        basis = None  # shared by the blocks' plain-torch paths (the fused kernels build their own)
        if self.num_basis > 0 and not all(block.attn._use_triton(terms, x) for block in self.blocks):
            basis = distance_basis(terms.dist, self.num_basis, self.basis_max, self.basis_width_scale)
        for block in self.blocks:
            x = block(x, terms, basis)
        return x

    def forward(self, data: Any) -> dict[str, Tensor]:
        """``{"y": [B, T]}``: mean of the atom features per crystal through the output MLP."""
        x = self.encode(data)
        batch, num_graphs = self._batch(data, x)
        pooled = segment_mean(x, batch, num_graphs)
        return {"y": self.head(pooled)}

    @staticmethod
    def _batch(data: Any, x: Tensor) -> tuple[Tensor, int]:
        batch = getattr(data, "batch", None)
        if batch is None:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1
        return batch, int(getattr(data, "num_graphs", 0) or (int(batch.max()) + 1 if batch.numel() else 1))

    @torch.no_grad()
    def calibrate(self, data: Any) -> Crystalformer:
        """Set every block's sigma statistics from ``data`` (a training batch), as the first training
        step would; blocks already calibrated keep theirs. Returns ``self``."""
        training = self.training
        self.train()
        try:
            self.encode(data)
        finally:
            self.train(training)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"radius={self.radius:.3f} Å, parameters={self.num_parameters():,}"

