"""GATr's multivector self-attention, run on ``torch.nn.functional.scaled_dot_product_attention``.

Attention logits between items ``n`` and ``m`` (per head) are

    sum_c <q_nc, k_mc>  +  sum_c -|| q_nc[e123] k_mc[e0ij] - k_mc[e123] q_nc[e0ij] ||^2  +  q^s_n . k^s_m

scaled by ``1/sqrt(D)`` (``D`` the concatenated feature size): the invariant inner product
of the multivector channels (8 blades without e0), GATr's distance-aware term and the
auxiliary scalar channels. Both multivector terms are dot products of per-item features,
so they are concatenated with the scalar queries/keys into ordinary ``q, k`` of size
``8 C + 5 C + S`` and handed to SDPA (flash/efficient kernels on GPU). The distance term
uses ``phi(q) = (q_w^2, |q_o|^2, q_w q_o)`` and ``psi(k) = (-|k_o|^2, -k_w^2, 2 k_w k_o)``
(``w`` = e123 weight, ``o`` = the three e0ij components): ``phi . psi = -|q_w k_o - k_w q_o|^2``,
which for embedded points is minus the squared Euclidean distance; it is invariant under
translations (``o -> o + w t``), rotations and reflections. Values are the multivector
channels flattened (``16 C``) plus the value scalars.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from equiformer.ga.layers import EquiLinear

__all__ = ["INNER_BLADES", "attention_features", "sdpa_head_width", "geometric_attention", "SelfAttention"]

INNER_BLADES = (0, 2, 3, 4, 8, 9, 10, 14)  # blades without e0: the invariant inner product
_W = 14  # e123
_O = (11, 12, 13)  # e012, e013, e023 (contiguous: sliced, not gathered)


@functools.lru_cache(maxsize=None)
def _inner_index(device: torch.device) -> torch.Tensor:
    # one index tensor per device: indexing with a Python list would build it (and copy it to
    # the GPU) on every call
    with torch.inference_mode(False):
        return torch.tensor(INNER_BLADES, device=device)


def _inner_blades(device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(INNER_BLADES, device=device)
    return _inner_index(device)


def attention_features(
    mv: torch.Tensor, s: torch.Tensor, role: str, distance: bool = True
) -> torch.Tensor:
    """Query or key features ``[..., 8C (+5C) + S]`` from ``mv [..., C, 16]`` and ``s [..., S]``.

    ``role`` is ``"query"`` or ``"key"`` (the distance features are asymmetric).
    """
    parts = [mv.index_select(-1, _inner_blades(mv.device)).flatten(-2)]
    if distance:
        w = mv[..., _W : _W + 1]
        o = mv[..., _O[0] : _O[-1] + 1]
        o2 = (o * o).sum(-1, keepdim=True)
        if role == "query":
            feat = torch.cat([w * w, o2, w * o], dim=-1)
        elif role == "key":
            feat = torch.cat([-o2, -w * w, 2.0 * w * o], dim=-1)
        else:
            raise ValueError(f"role must be 'query' or 'key', got {role!r}")
        parts.append(feat.flatten(-2))
    parts.append(s)
    return torch.cat(parts, dim=-1)


def sdpa_head_width(d_qk: int, d_v: int) -> int:
    """The one head size that :func:`geometric_attention` hands to SDPA for q/k size ``d_qk`` and v size ``d_v``.

    Flash / memory-efficient SDPA kernels need one head size for q, k and v, a multiple of 8:
    the larger of the two rounded up to 8 (q, k and v are zero-padded to it).
    """
    return -(-max(d_qk, d_v) // 8) * 8


def geometric_attention(
    q_mv: torch.Tensor,
    k_mv: torch.Tensor,
    v_mv: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    mask: torch.Tensor | None = None,
    distance: bool = True,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multivector attention on ``[B, H, N, C, 16]`` / ``[B, H, N, S]`` tensors.

    ``mask``: boolean, broadcastable to ``[B, H, N_q, N_k]``, True where attention is allowed
    (e.g. a key-padding mask ``[B, 1, 1, N]``). Returns ``(mv [B, H, N, C_v, 16], s [B, H, N, S_v])``.
    """
    q = attention_features(q_mv, q_s, "query", distance)
    k = attention_features(k_mv, k_s, "key", distance)
    c_v, s_v = v_mv.shape[-2], v_s.shape[-1]
    v = torch.cat([v_mv.flatten(-2), v_s], dim=-1)
    # zero-pad q, k, v to one head size (sdpa_head_width): zeros add nothing to q.k, padded value
    # columns are sliced off, and the softmax keeps the scale of the unpadded query/key size
    d_qk, d_v = q.shape[-1], v.shape[-1]
    width = sdpa_head_width(d_qk, d_v)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=d_qk**-0.5)
    out_mv, out_s, _ = out.split([16 * c_v, s_v, width - 16 * c_v - s_v], dim=-1)
    return out_mv.unflatten(-1, (c_v, 16)), out_s


class SelfAttention(nn.Module):
    """Multi-head multivector self-attention over the item axis ``-3`` of ``mv [..., N, C, 16]``.

    ``(mv [..., N, C, 16], s [..., N, S], mask [..., N] bool) -> (mv [..., N, out_mv, 16], s [..., N, out_s])``.
    Each of ``num_heads`` heads has ``head_mv`` multivector and ``head_s`` scalar channels
    for queries, keys and values, made by one :class:`EquiLinear`; heads are merged by another.
    ``mask`` marks real items (True) against padding; padded keys get no attention.
    """

    def __init__(
        self,
        in_mv: int,
        in_s: int,
        num_heads: int = 4,
        head_mv: int = 8,
        head_s: int = 16,
        out_mv: int | None = None,
        out_s: int | None = None,
        distance: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_mv, self.head_s = num_heads, head_mv, head_s
        self.distance, self.dropout = distance, dropout
        out_mv = in_mv if out_mv is None else out_mv
        out_s = in_s if out_s is None else out_s
        self.qkv = EquiLinear(in_mv, 3 * num_heads * head_mv, in_s, 3 * num_heads * head_s)
        self.out = EquiLinear(num_heads * head_mv, out_mv, num_heads * head_s, out_s)

    def forward(
        self, mv: torch.Tensor, s: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lead, n = mv.shape[:-3], mv.shape[-3]
        h, cm, cs = self.num_heads, self.head_mv, self.head_s
        qkv_mv, qkv_s = self.qkv(mv, s)
        # [..., N, 3, H, C, 16] -> [3, B, H, N, C, 16]
        qkv_mv = qkv_mv.reshape(-1, n, 3, h, cm, 16).permute(2, 0, 3, 1, 4, 5)
        qkv_s = qkv_s.reshape(-1, n, 3, h, cs).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            if mask.shape != (*lead, n):
                raise ValueError(f"mask must have shape {(*lead, n)} (items), got {tuple(mask.shape)}")
            attn_mask = mask.reshape(-1, 1, 1, n).to(torch.bool)
        o_mv, o_s = geometric_attention(
            *qkv_mv.unbind(0), *qkv_s.unbind(0),  # unbind: one stack in backward instead of three select_backwards
            mask=attn_mask, distance=self.distance, dropout_p=self.dropout if self.training else 0.0,
        )
        o_mv = o_mv.permute(0, 2, 1, 3, 4).reshape(*lead, n, h * cm, 16)
        o_s = o_s.permute(0, 2, 1, 3).reshape(*lead, n, h * cs)
        return self.out(o_mv, o_s)
