"""The projective geometric algebra G(3,0,1): blades and product tables.

A multivector is a tensor ``[..., 16]`` over the basis blades (DESIGN.md order)::

    index: 0  1   2   3   4   5    6    7    8    9    10   11    12    13    14    15
    blade: 1  e0  e1  e2  e3  e01  e02  e03  e12  e13  e23  e012  e013  e023  e123  e0123

with ``e0^2 = 0`` and ``e1^2 = e2^2 = e3^2 = 1``. Every blade is written with ascending
generator indices. The tables are computed once, at import, from the blades as bitmasks
(bit ``g`` set <=> generator ``e_g`` present): the product of two blades ``A`` and ``B`` is
the blade ``A xor B`` with sign ``(-1)^(swaps)`` times the squares of the shared
generators, where ``swaps`` counts the transpositions needed to sort ``A`` followed by
``B``. Nothing here is typed in by hand.

Tables (numpy, float64; torch copies per device/dtype through :func:`table`):

- ``GP[i, j, k]``: geometric product, ``(x y)_k = sum_ij x_i y_j GP[i, j, k]``;
- ``OP[i, j, k]``: outer (wedge) product;
- ``JOIN[i, j, k]``: regressive product ``x v y = undual(dual(x) ^ dual(y))``;
- ``REVERSE``, ``INVOLUTION``: per-blade signs of the reverse and the grade involution;
- ``DUAL_PERM``, ``DUAL_SIGN``: the dual as a signed permutation (see :data:`DUAL_SIGN`);
- ``INNER_MASK``: 1 on the 8 blades without ``e0`` (the invariant inner product's support);
- ``GRADES``: the grade of each blade.

Dual convention (documented choice). The metric dual ``x I^-1`` does not exist in PGA
(``I^2 = 0``), so we use the metric-free *right complement*: ``dual(e_A) = s_A e_Abar``
where ``Abar`` is the complementary set of generators and ``s_A = +-1`` is fixed by
``e_A ^ dual(e_A) = e0123``. Its inverse ``undual`` is the left complement
(``undual(e_A) ^ e_A = e0123``). This equals ``clifford``'s ``MultiVector.dual()`` /
``vee`` for degenerate metrics, so the join can be checked against an independent library.
The join is equivariant under the even (proper) motions and picks up a factor ``-1``
(the determinant) under reflections; GATr fixes that sign with the e123 component of a
reference multivector (see :func:`equiformer.ga.products.join`).
"""

from __future__ import annotations

import functools
from itertools import combinations

import numpy as np
import torch

__all__ = [
    "BLADES",
    "BLADE_NAMES",
    "GRADES",
    "METRIC",
    "GP",
    "OP",
    "JOIN",
    "REVERSE",
    "INVOLUTION",
    "DUAL_PERM",
    "DUAL_SIGN",
    "UNDUAL_PERM",
    "UNDUAL_SIGN",
    "INNER_MASK",
    "blade_index",
    "table",
]

METRIC: tuple[float, ...] = (0.0, 1.0, 1.0, 1.0)  # squares of e0, e1, e2, e3
_N_GEN = 4

# DESIGN.md order: by grade, then lexicographic over ascending generator tuples.
BLADES: tuple[tuple[int, ...], ...] = tuple(
    c for k in range(_N_GEN + 1) for c in combinations(range(_N_GEN), k)
)
BLADE_NAMES: tuple[str, ...] = tuple("1" if not b else "e" + "".join(map(str, b)) for b in BLADES)
GRADES: np.ndarray = np.array([len(b) for b in BLADES], dtype=np.int64)

_MASKS = [sum(1 << g for g in b) for b in BLADES]
_INDEX_OF_MASK = {m: i for i, m in enumerate(_MASKS)}


def blade_index(name: str) -> int:
    """Index of a blade given its name, e.g. ``"e023" -> 13`` and ``"1" -> 0``."""
    try:
        return BLADE_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown blade {name!r}; blades are {BLADE_NAMES}") from None


def _reorder_sign(a: int, b: int) -> int:
    """Sign of moving the generators of blade mask ``b`` past those of ``a`` into order."""
    swaps = 0
    a >>= 1
    while a:
        swaps += bin(a & b).count("1")
        a >>= 1
    return -1 if swaps % 2 else 1


def _blade_product(a: int, b: int) -> tuple[int, float]:
    """Geometric product of two basis blades (masks): (result mask, coefficient)."""
    coeff = float(_reorder_sign(a, b))
    common = a & b
    for g in range(_N_GEN):
        if common >> g & 1:
            coeff *= METRIC[g]
    return a ^ b, coeff


def _build_tables() -> dict[str, np.ndarray]:
    n = len(BLADES)
    gp = np.zeros((n, n, n))
    op = np.zeros((n, n, n))
    for i, a in enumerate(_MASKS):
        for j, b in enumerate(_MASKS):
            m, c = _blade_product(a, b)
            k = _INDEX_OF_MASK[m]
            gp[i, j, k] = c
            if a & b == 0:
                op[i, j, k] = _reorder_sign(a, b)
    grades = GRADES
    reverse = np.where((grades * (grades - 1) // 2) % 2 == 1, -1.0, 1.0)
    involution = np.where(grades % 2 == 1, -1.0, 1.0)

    full = (1 << _N_GEN) - 1
    i_ps = _INDEX_OF_MASK[full]
    dual_perm = np.zeros(n, dtype=np.int64)  # dual(x)[k] = DUAL_SIGN[k] * x[DUAL_PERM[k]]
    dual_sign = np.zeros(n)
    undual_perm = np.zeros(n, dtype=np.int64)
    undual_sign = np.zeros(n)
    for i, a in enumerate(_MASKS):
        c = full ^ a
        k = _INDEX_OF_MASK[c]
        s_right = op[i, k, i_ps]  # e_A ^ e_Abar = s e0123  -> dual(e_A) = s e_Abar
        s_left = op[k, i, i_ps]  # e_Abar ^ e_A = s e0123  -> undual(e_A) = s e_Abar
        dual_perm[k], dual_sign[k] = i, s_right
        undual_perm[k], undual_sign[k] = i, s_left

    # dense signed-permutation matrices: dual(x) = x @ D
    d = np.zeros((n, n))
    u = np.zeros((n, n))
    d[dual_perm, np.arange(n)] = dual_sign
    u[undual_perm, np.arange(n)] = undual_sign
    # join: undual(dual(x) ^ dual(y)) as one bilinear table
    join = np.einsum("ia,jb,abc,ck->ijk", d, d, op, u)
    inner_mask = np.array([0.0 if 0 in b else 1.0 for b in BLADES])
    return {
        "GP": gp,
        "OP": op,
        "JOIN": join,
        "REVERSE": reverse,
        "INVOLUTION": involution,
        "DUAL_PERM": dual_perm,
        "DUAL_SIGN": dual_sign,
        "UNDUAL_PERM": undual_perm,
        "UNDUAL_SIGN": undual_sign,
        "INNER_MASK": inner_mask,
        "GRADES": grades,
    }


_TABLES = _build_tables()
for _arr in _TABLES.values():
    _arr.setflags(write=False)

GP: np.ndarray = _TABLES["GP"]
OP: np.ndarray = _TABLES["OP"]
JOIN: np.ndarray = _TABLES["JOIN"]
REVERSE: np.ndarray = _TABLES["REVERSE"]
INVOLUTION: np.ndarray = _TABLES["INVOLUTION"]
DUAL_PERM: np.ndarray = _TABLES["DUAL_PERM"]
DUAL_SIGN: np.ndarray = _TABLES["DUAL_SIGN"]
UNDUAL_PERM: np.ndarray = _TABLES["UNDUAL_PERM"]
UNDUAL_SIGN: np.ndarray = _TABLES["UNDUAL_SIGN"]
INNER_MASK: np.ndarray = _TABLES["INNER_MASK"]


@functools.lru_cache(maxsize=None)
def _table_cached(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    arr = _TABLES[name]
    # never an inference tensor: the cache outlives the inference_mode block it was filled in
    with torch.inference_mode(False):
        if arr.dtype == np.int64:
            return torch.as_tensor(np.array(arr), device=device)
        return torch.as_tensor(np.array(arr), dtype=dtype, device=device)


_CPU_TABLES = {k: torch.tensor(v.tolist(), dtype=torch.int64 if v.dtype == np.int64 else torch.float64)
               for k, v in _TABLES.items()}


def table(name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A table (see module docstring) as a torch tensor on ``device`` in ``dtype``.

    Integer tables (``DUAL_PERM``, ``UNDUAL_PERM``, ``GRADES``) stay int64. Eagerly the
    result is cached per (device, dtype); under ``torch.compile`` it is a graph constant
    (the cache would break ``fullgraph=True``).
    """
    if name not in _TABLES:
        raise KeyError(f"unknown table {name!r}; known: {sorted(_TABLES)}")
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling():
        t = _CPU_TABLES[name]
        return t.to(device=device) if t.dtype == torch.int64 else t.to(device=device, dtype=dtype)
    return _table_cached(name, device, dtype)
