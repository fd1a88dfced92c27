"""Structures in, data contract out: converters and file reading.

>>> from equiformer.data import from_smiles, read, to_ase
>>> data = from_smiles("CCO", seed=0)          # 3D ethanol, hydrogens added
>>> datas = read("many.sdf")                    # one Data per record
>>> atoms = to_ase(datas[0])

Every structure is a :class:`torch_geometric.data.Data` following
:mod:`equiformer.data.contract` (z, pos in Å, cell [1,3,3] in Å, pbc [1,3], optional energy
in eV and forces in eV/Å) plus ``source`` and ``name`` strings. Bad input raises
:class:`StructureError` (a ``ValueError``) naming the file or source and the problem.
"""

from __future__ import annotations

from equiformer.data.contract import (
    ATOMIC_NUMBERS,
    CHEMICAL_SYMBOLS,
    StructureError,
    atomic_number,
    formula,
    make_data,
)
from equiformer.data.convert import (
    from_ase,
    from_pymatgen,
    from_rdkit,
    from_smiles,
    to_ase,
    to_pymatgen,
    to_rdkit,
)
from equiformer.data.io import FORMATS, guess_format, read
from equiformer.data.summary import describe

__all__ = [
    "ATOMIC_NUMBERS",
    "CHEMICAL_SYMBOLS",
    "FORMATS",
    "StructureError",
    "atomic_number",
    "describe",
    "formula",
    "from_ase",
    "from_pymatgen",
    "from_rdkit",
    "from_smiles",
    "guess_format",
    "make_data",
    "read",
    "to_ase",
    "to_pymatgen",
    "to_rdkit",
]
