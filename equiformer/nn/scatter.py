"""Segment reductions over a leading index (edges -> nodes, nodes -> graphs) in plain torch.

``index_add_`` and ``scatter_reduce`` replace torch-scatter; nothing here synchronises with the
host: the number of segments is always passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["segment_max", "segment_mean", "segment_softmax", "segment_sum"]


def segment_sum(src: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """``out[s] = sum_{k: index[k] = s} src[k]``.

    Args:
        src: [K, ...] values.
        index: [K] long segment ids in ``[0, num_segments)``.
        num_segments: S.
    Returns:
        [S, ...]; empty segments are 0.
    """
    out = src.new_zeros((num_segments,) + tuple(src.shape[1:]))
    return out.index_add_(0, index, src)


def segment_mean(src: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Mean of ``src`` [K, ...] per segment -> [S, ...]; empty segments are 0."""
    total = segment_sum(src, index, num_segments)
    count = torch.zeros(num_segments, dtype=src.dtype, device=src.device)
    count.index_add_(0, index, torch.ones_like(index, dtype=src.dtype))
    return total / count.clamp_min(1).view((-1,) + (1,) * (src.dim() - 1))


def segment_max(src: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Maximum of ``src`` [K, ...] per segment -> [S, ...]; empty segments are 0."""
    expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    out = src.new_zeros((num_segments,) + tuple(src.shape[1:]))
    return out.scatter_reduce(0, expanded, src, reduce="amax", include_self=False)


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int, weights: Tensor | None = None) -> Tensor:
    """Softmax of ``logits`` over the entries of each segment (e.g. over the incoming edges of a node).

    ``out[k] = w[k] exp(logits[k]) / sum_{m in seg(k)} w[m] exp(logits[m])``. Non-negative ``weights``
    softly mask entries: an entry whose weight goes smoothly to 0 (an edge reaching the cutoff) leaves
    the softmax smoothly, so the result stays continuous in the weights.

    Args:
        logits: [K] or [K, H] (H heads).
        index: [K] long segment ids.
        num_segments: S.
        weights: optional [K] non-negative weights.
    Returns:
        [K] or [K, H] attention weights summing to 1 over each non-empty segment.
    """
    shift = segment_max(logits.detach(), index, num_segments).index_select(0, index)
    numerator = torch.exp(logits - shift)
    if weights is not None:
        numerator = numerator * weights.view((-1,) + (1,) * (logits.dim() - 1))
    denominator = segment_sum(numerator, index, num_segments).index_select(0, index)
    return numerator / denominator.clamp_min(torch.finfo(logits.dtype).tiny)
