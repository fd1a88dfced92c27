"""Equivariant graph attention (Equiformer, Liao & Smidt, ICLR 2023).

For an edge j -> i with features ``x``, harmonics ``Y(r_ij)`` and radial basis ``rbf(r_ij)``:

1. ``m_ij = DTP(Lin_src(x_j) + Lin_dst(x_i), Y(r_ij); MLP(rbf))`` (depth-wise TP, per-edge weights);
2. logits per head ``h``:
   * ``"mlp"`` (MLP attention): ``a_ij^h = <alpha_h, SmoothLeakyReLU(Lin_alpha(m_ij))^h>`` from scalars only;
   * ``"dot_product"``: ``a_ij^h = sum_irreps <q_i^h, k_ij^h> / sqrt(#irreps * (2l+1))`` with
     ``q = Lin_q(x_i)``, ``k = Lin_k(m_ij)``;
3. values: non-linear ``v_ij = Lin(DTP(Gate(Lin(m_ij)), Y(r_ij)))`` or linear ``v_ij = Lin(m_ij)``;
4. ``out_i = Lin_proj(sum_j softmax_j(a_ij) v_ij)``, softmax over the incoming edges of i per head,
   optionally softly masked by smooth cutoff weights ``w_ij`` (``w e^a / sum w e^a``) so that an edge
   crossing the cutoff enters and leaves smoothly.

The logits are invariant, so the output is equivariant for any irreps; E(3) vs SE(3) is decided
by the irreps (parity labels) the caller chooses.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor, nn

from equiformer.o3.irreps import as_irreps, check_canonical, heads_irreps, num_even_scalars

from .activation import Gate, SmoothLeakyReLU
from .scatter import segment_softmax, segment_sum
from .tensor_product import DepthwiseTensorProduct, EquivariantLinear, RadialTensorProduct

__all__ = ["ATTENTION_TYPES", "EquivariantGraphAttention"]

ATTENTION_TYPES = ("mlp", "dot_product")


class EquivariantGraphAttention(nn.Module):
    """Multi-head equivariant graph attention over the edges of a graph (see module docstring).

    Args:
        irreps_node: canonical irreps of the node features (input).
        irreps_sh: irreps of the edge spherical harmonics.
        irreps_head: canonical irreps of one head, e.g. ``"32x0e+16x1e+8x2e"``.
        num_heads: H.
        radial_channels: ``[num_basis, hidden...]`` of the radial MLP giving the TP weights.
        irreps_out: output irreps (default ``irreps_node``).
        irreps_pre_attn: irreps of the merged source+target message (default ``irreps_node``).
        attention: ``"mlp"`` or ``"dot_product"``.
        nonlinear_message: gate + second depth-wise TP on the values (the paper's default).
        alpha_drop: dropout on the attention weights during training.
        negative_slope: of the smooth leaky ReLU in MLP attention.
        tp_backend: ``"fused"`` or ``"e3nn"`` (see :class:`DepthwiseTensorProduct`).
    """

    def __init__(
        self,
        irreps_node: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_head: str | o3.Irreps,
        num_heads: int,
        radial_channels: list[int],
        irreps_out: str | o3.Irreps | None = None,
        irreps_pre_attn: str | o3.Irreps | None = None,
        attention: str = "mlp",
        nonlinear_message: bool = True,
        alpha_drop: float = 0.0,
        negative_slope: float = 0.2,
        tp_backend: str = "fused",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTION_TYPES}")
        self.irreps_node = check_canonical(irreps_node, "irreps_node")
        self.irreps_sh = as_irreps(irreps_sh)
        self.irreps_head = check_canonical(irreps_head, "irreps_head")
        self.irreps_out = check_canonical(irreps_out if irreps_out is not None else self.irreps_node, "irreps_out")
        irreps_pre = check_canonical(irreps_pre_attn if irreps_pre_attn is not None else self.irreps_node, "irreps_pre_attn")
        self.num_heads = int(num_heads)
        self.attention = attention
        self.nonlinear_message = bool(nonlinear_message)
        self.irreps_value = heads_irreps(self.irreps_head, self.num_heads)

        self.merge_src = EquivariantLinear(self.irreps_node, irreps_pre, bias=True)
        self.merge_dst = EquivariantLinear(self.irreps_node, irreps_pre, bias=False)
        self.edge_tp = RadialTensorProduct(irreps_pre, self.irreps_sh, irreps_pre, radial_channels, tp_backend)
        irreps_mid = self.edge_tp.irreps_out

        if attention == "mlp":
            self.alpha_channels = num_even_scalars(self.irreps_head)
            if self.alpha_channels == 0:
                raise ValueError(f"MLP attention needs 0e channels in irreps_head, got {self.irreps_head}")
            self.alpha_lin = EquivariantLinear(irreps_mid, f"{self.alpha_channels * self.num_heads}x0e")
            self.alpha_act = SmoothLeakyReLU(negative_slope)
            bound = math.sqrt(6.0 / (self.num_heads + self.alpha_channels))  # glorot, as GATv2
            self.alpha_dot = nn.Parameter(torch.empty(self.num_heads, self.alpha_channels).uniform_(-bound, bound))
        else:
            self.query = EquivariantLinear(self.irreps_node, self.irreps_value)
            self.key = EquivariantLinear(irreps_mid, self.irreps_value)
            num_irreps = self.irreps_head.num_irreps
            scale = [1.0 / math.sqrt(num_irreps * ir.dim) for mul, ir in self.irreps_value for _ in range(mul * ir.dim)]
            self.register_buffer("dot_scale", torch.tensor(scale, dtype=torch.get_default_dtype()), persistent=False)

        if self.nonlinear_message:
            self.value_gate = Gate(irreps_pre)
            self.value_lin1 = EquivariantLinear(irreps_mid, self.value_gate.irreps_in)
            self.value_tp = DepthwiseTensorProduct(
                irreps_pre, self.irreps_sh, self.irreps_value, shared_weights=True, backend=tp_backend
            )
            self.value_lin2 = EquivariantLinear(self.value_tp.irreps_out, self.irreps_value)
        else:
            self.value_lin = EquivariantLinear(irreps_mid, self.irreps_value)

        # channel c of a block (mul*H) x ir belongs to head c // mul
        head = [c // mul for mul, ir in self.irreps_head for c in range(mul * self.num_heads) for _ in range(ir.dim)]
        self.register_buffer("head_of_component", torch.tensor(head, dtype=torch.long), persistent=False)
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None
        self.proj = EquivariantLinear(self.irreps_value, self.irreps_out)

    def attention_logits(self, x: Tensor, message: Tensor, dst: Tensor) -> Tensor:
        """Invariant logits [E, H] from node features x [N, D] and edge messages [E, D_mid]."""
        if self.attention == "mlp":
            a = self.alpha_act(self.alpha_lin(message)).view(-1, self.num_heads, self.alpha_channels)
            return (a * self.alpha_dot).sum(-1)
        q = self.query(x).index_select(0, dst)
        k = self.key(message)
        products = q * k * self.dot_scale
        logits = products.new_zeros(products.shape[0], self.num_heads)
        return logits.index_add_(1, self.head_of_component, products)

    def values(self, message: Tensor, edge_sh: Tensor) -> Tensor:
        """Equivariant values [E, irreps_value.dim] of the edge messages."""
        if self.nonlinear_message:
            hidden = self.value_gate(self.value_lin1(message))
            return self.value_lin2(self.value_tp(hidden, edge_sh))
        return self.value_lin(message)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_sh: Tensor,
        edge_scalars: Tensor,
        edge_weight: Tensor | None = None,
    ) -> Tensor:
        """Attend over incoming edges.

        Args:
            x: [N, irreps_node.dim] node features.
            edge_index: [2, E]; row 0 = source j, row 1 = target i.
            edge_sh: [E, irreps_sh.dim] spherical harmonics of ``r_ij = pos_j - pos_i``.
            edge_scalars: [E, num_basis] radial basis of ``|r_ij|``.
            edge_weight: optional [E] smooth cutoff weights in [0, 1] (soft mask of the softmax).
        Returns:
            [N, irreps_out.dim].
        """
        src, dst = edge_index[0], edge_index[1]
        num_nodes = x.shape[0]
        merged = self.merge_src(x).index_select(0, src) + self.merge_dst(x).index_select(0, dst)
        message = self.edge_tp(merged, edge_sh, edge_scalars)
        logits = self.attention_logits(x, message, dst)
        alpha = segment_softmax(logits, dst, num_nodes, weights=edge_weight)  # [E, H]
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        weighted = self.values(message, edge_sh) * alpha.index_select(1, self.head_of_component)
        return self.proj(segment_sum(weighted, dst, num_nodes))

    def extra_repr(self) -> str:
        return (
            f"attention={self.attention!r}, num_heads={self.num_heads}, irreps_head={self.irreps_head}, "
            f"nonlinear_message={self.nonlinear_message}"
        )
