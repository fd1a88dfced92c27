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


def _qk_feature_swap(cm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and scale turning per-role ``(w^2, |o|^2, w o)`` into query ``phi`` / key ``psi`` features.

    Applied to the last axis of ``[..., 2 (query, key), cm, 5]`` flattened to ``10 cm``: the query
    half is kept, the key half becomes ``(-|o|^2, -w^2, 2 w o)`` (a swap of the first two and a scale).
    """
    per = torch.arange(5 * cm).view(cm, 5)
    key = per[:, [1, 0, 2, 3, 4]] + 5 * cm
    index = torch.cat([per.reshape(-1), key.reshape(-1)])
    scale = torch.cat([torch.ones(5 * cm), torch.tensor([-1.0, -1.0, 2.0, 2.0, 2.0], dtype=torch.float64).repeat(cm)])
    return index, scale


class SelfAttention(nn.Module):
    """Multi-head multivector self-attention over the item axis ``-3`` of ``mv [..., N, C, 16]``.

    ``(mv [..., N, C, 16], s [..., N, S], mask [..., N] bool) -> (mv [..., N, out_mv, 16], s [..., N, out_s])``.
    Each of ``num_heads`` heads has ``head_mv`` multivector and ``head_s`` scalar channels
    for queries, keys and values, made by one :class:`EquiLinear`; heads are merged by another.
    ``mask`` marks real items (True) against padding; padded keys get no attention.

    Computes :func:`geometric_attention` of the heads with few kernels: the ``qkv`` map's fused
    matrix is laid out (:meth:`EquiLinear.set_layout`) so that one GEMM emits, per head, the values
    already zero-padded to the SDPA head size and, for queries and keys, the inner-product blades
    and scalars (zero-padded) followed by the ``e123, e0ij`` blades of the distance term; the
    distance features of queries and keys are made together, and the ``out`` map reads SDPA's
    padded ``[..., N, H, width]`` output directly (zero columns for the padding).
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
        h, cm, cs = num_heads, head_mv, head_s
        self._d_qk = 8 * cm + (5 * cm if distance else 0) + cs
        self._width = sdpa_head_width(self._d_qk, 16 * cm + cs)
        self._lin = self._width - (5 * cm if distance else 0)  # q/k columns straight from the GEMM (zero-padded)
        self._raw = 4 * cm if distance else 0  # e123, e012, e013, e023 per channel
        rows = self._qkv_rows()
        self.qkv.set_layout(rows=rows)
        qkv_real = num_heads * (self._width + 2 * (self._lin + self._raw))
        self._qkv_split = [num_heads * self._width, qkv_real - num_heads * self._width] + ([len(rows) - qkv_real] if len(rows) > qkv_real else [])
        self.out.set_layout(cols=self._out_cols())
        index, scale = _qk_feature_swap(cm)
        self.register_buffer("_feat_index", index, persistent=False)
        self.register_buffer("_feat_scale", scale.to(torch.get_default_dtype()), persistent=False)

    def _qkv_rows(self) -> torch.Tensor:
        """Rows of the qkv GEMM: ``[v: H x width][q, k per head: H x 2 x (lin + raw)][zero rows to a multiple of 8]``.

        Standard qkv outputs: mv channel ``(t*H + h)*cm + c`` (t = 0, 1, 2 for q, k, v) at rows
        ``16*channel + blade``, then scalar ``(t*H + h)*cs + j`` after all ``3*H*cm*16`` mv rows.
        Values come first so that v (and, through the alignment, q/k) start 16-byte aligned for SDPA.
        """
        h_, cm, cs, width = self.num_heads, self.head_mv, self.head_s, self._width
        n_mv_rows = 3 * h_ * cm * 16

        def mv_row(t: int, h: int, c: int, b: int) -> int:
            return ((t * h_ + h) * cm + c) * 16 + b

        def s_row(t: int, h: int, j: int) -> int:
            return n_mv_rows + (t * h_ + h) * cs + j

        rows: list[int] = []
        for h in range(h_):  # values: mv channels, scalars, zero padding
            rows += [mv_row(2, h, c, b) for c in range(cm) for b in range(16)]
            rows += [s_row(2, h, j) for j in range(cs)]
            rows += [-1] * (width - 16 * cm - cs)
        for h in range(h_):
            for t in (0, 1):  # query, key
                rows += [mv_row(t, h, c, b) for c in range(cm) for b in INNER_BLADES]
                rows += [s_row(t, h, j) for j in range(cs)]
                rows += [-1] * (self._lin - 8 * cm - cs)
                if self.distance:
                    rows += [mv_row(t, h, c, b) for c in range(cm) for b in (_W, *_O)]
        rows += [-1] * (-len(rows) % 8)
        return torch.tensor(rows)

    def _out_cols(self) -> torch.Tensor:
        """Columns of the out GEMM: SDPA's output ``[H x (mv 16 cm, s cs, padding)]``."""
        h_, cm, cs = self.num_heads, self.head_mv, self.head_s
        cols: list[int] = []
        for h in range(h_):
            cols += [(h * cm + c) * 16 + b for c in range(cm) for b in range(16)]
            cols += [h_ * cm * 16 + h * cs + j for j in range(cs)]
            cols += [-1] * (self._width - 16 * cm - cs)
        return torch.tensor(cols)

    def forward(
        self, mv: torch.Tensor, s: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mv.shape[-2:] != (self.qkv.in_mv, 16):
            raise ValueError(f"SelfAttention expects multivectors [..., N, {self.qkv.in_mv}, 16], got {tuple(mv.shape)}")
        lead, n = mv.shape[:-3], mv.shape[-3]
        h, width, lin, raw = self.num_heads, self._width, self._lin, self._raw
        x = mv.reshape(-1, n, self.qkv.in_mv * 16)
        if self.qkv.in_s:
            if s is None or s.shape[-1] != self.qkv.in_s:
                raise ValueError(f"SelfAttention expects scalars [..., N, {self.qkv.in_s}], got {None if s is None else tuple(s.shape)}")
            x = torch.cat([x, s.reshape(-1, n, self.qkv.in_s)], dim=-1)
        # split, not slicing: the backward of a split is one cat, of a slice a zeros + copy each
        v, qk, *_ = self.qkv.linear_flat(x).split(self._qkv_split, dim=-1)  # [B, N, rows]
        v = v.unflatten(-1, (h, width))  # [B, N, H, width]
        qk = qk.unflatten(-1, (h, 2, lin + raw))
        if self.distance:
            qk, wo = qk.split([lin, raw], dim=-1)
            wo = wo.unflatten(-1, (self.head_mv, 4))  # [B, N, H, 2, cm, (e123, e0ij)]
            w, o = wo.split([1, 3], dim=-1)
            ww, oo = (wo * wo).split([1, 3], dim=-1)
            feat = torch.cat([ww, oo.sum(-1, keepdim=True), w * o], dim=-1)  # (w^2, |o|^2, w o)
            feat = feat.flatten(-3).index_select(-1, self._feat_index) * self._feat_scale.to(feat.dtype)
            qk = torch.cat([qk, feat.unflatten(-1, (2, -1))], dim=-1)  # [B, N, H, 2, width]
        q, k = qk.unbind(-2)  # unbind: one stack in backward
        attn_mask = None
        if mask is not None:
            if mask.shape != (*lead, n):
                raise ValueError(f"mask must have shape {(*lead, n)} (items), got {tuple(mask.shape)}")
            attn_mask = mask.reshape(-1, 1, 1, n).to(torch.bool)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0, scale=self._d_qk**-0.5,
        )  # [B, H, N, width]
        y = self.out.linear_flat(out.transpose(1, 2).reshape(*lead, n, h * width))
        o_mv, o_s = y.split([self.out.out_mv * 16, self.out.out_s], dim=-1)
        return o_mv.unflatten(-1, (self.out.out_mv, 16)), o_s
