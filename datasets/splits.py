"""Random train/val/test splits by index, reusable by every dataset.

The split depends on the dataset size ``n`` and a seed only, so it can be computed (and
checked) without loading any structures.

Protocol: ``numpy.random.default_rng(seed).permutation(n)`` cut into consecutive pieces in
the order the sizes are given. With ``seed=1`` and sizes 110,000 / 10,000 / rest on QM9's
130,831 molecules this is the protocol of the Equiformer repository's QM9 loader
(``torchmd_net_split=True`` in ``datasets/pyg/qm9.py``), which follows TorchMD-NET.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: default seed of the random split (Equiformer / TorchMD-NET use 1 for QM9)
DEFAULT_SPLIT_SEED = 1

SizeSpec = int | float | None


def resolve_split_sizes(n: int, sizes: Mapping[str, SizeSpec] | Sequence[SizeSpec]) -> dict[str, int]:
    """Turn requested sizes into integer counts.

    Args:
        n: number of items in the dataset.
        sizes: ordered ``{name: size}`` (or a sequence, named ``train``, ``val``, ``test``,
            ``split3``, ...). A size is an ``int`` count, a ``float`` in ``(0, 1)`` meaning a
            fraction of ``n`` (rounded down), or ``None`` for "all that is left" (at most one).

    Returns:
        ``{name: count}`` in the given order; the counts sum to at most ``n``.

    Raises:
        ValueError: negative sizes, more than one ``None``, or sizes adding up to more than ``n``.
    """
    if isinstance(sizes, Mapping):
        items = list(sizes.items())
    else:
        default_names = ("train", "val", "test")
        items = [(default_names[k] if k < 3 else f"split{k}", s) for k, s in enumerate(sizes)]
    if n < 0:
        raise ValueError(f"dataset size must be >= 0, got {n}")
    counts: dict[str, int | None] = {}
    for name, size in items:
        if size is None:
            counts[name] = None
        elif isinstance(size, float) and not float(size).is_integer():
            if not 0.0 < size < 1.0:
                raise ValueError(f"split {name!r}: a fractional size must lie in (0, 1), got {size}")
            counts[name] = int(size * n)
        else:
            if int(size) < 0:
                raise ValueError(f"split {name!r}: size must be >= 0, got {size}")
            counts[name] = int(size)
    rest = [k for k, v in counts.items() if v is None]
    if len(rest) > 1:
        raise ValueError(f"only one split may take the remainder (size None), got {rest}")
    fixed = sum(v for v in counts.values() if v is not None)
    if fixed > n:
        raise ValueError(f"split sizes {dict(counts)} add up to {fixed}, more than the {n} items available")
    if rest:
        counts[rest[0]] = n - fixed
    return {k: int(v) for k, v in counts.items()}  # type: ignore[arg-type]


def random_split_indices(
    n: int,
    sizes: Mapping[str, SizeSpec] | Sequence[SizeSpec],
    seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, Tensor]:
    """Disjoint random index sets of ``range(n)``.

    Args:
        n: number of items.
        sizes: see :func:`resolve_split_sizes`, e.g. ``{"train": 110_000, "val": 10_000, "test": None}``.
        seed: seed of ``numpy.random.default_rng``; the same ``(n, sizes, seed)`` always gives
            the same split, on every platform.

    Returns:
        ``{name: LongTensor[count]}``; consecutive pieces of one random permutation, so the
        sets are disjoint. Items not covered by any size (when no size is ``None``) are unused.
    """
    counts = resolve_split_sizes(n, sizes)
    perm = np.random.default_rng(seed).permutation(n)
    out: dict[str, Tensor] = {}
    start = 0
    for name, count in counts.items():
        out[name] = torch.from_numpy(perm[start : start + count].astype(np.int64))
        start += count
    return out


def scaled_split_sizes(n: int, reference_n: int, sizes: Mapping[str, SizeSpec]) -> dict[str, int]:
    """Sizes for a subset of ``n`` items, proportional to sizes meant for ``reference_n`` items.

    Used when a dataset is cut to its first ``n`` items (tests, quick runs): e.g. QM9's
    110,000 / 10,000 / rest of 130,831 become 840 / 76 / 84 of 1,000. Every named split gets
    at least one item when ``n`` allows it; a ``None`` size keeps taking the remainder.
    """
    out: dict[str, SizeSpec] = {}
    for name, size in sizes.items():
        if size is None:
            out[name] = None
        elif isinstance(size, float) and not float(size).is_integer():
            out[name] = size
        else:
            out[name] = max(1 if n >= len(sizes) else 0, int(int(size) * n / reference_n))
    return resolve_split_sizes(n, out)


def resolve_index(i: int, n: int, owner: str, items: str) -> int:
    """``i`` as a position in ``range(n)`` (negative counts from the end).

    Raises ``IndexError("<owner> index <i> out of range for <n> <items>")``, e.g.
    ``resolve_index(i, len(ds), "QM9", "molecules")``.
    """
    j = int(i)
    if j < 0:
        j += n
    if not 0 <= j < n:
        raise IndexError(f"{owner} index {j} out of range for {n} {items}")
    return j
