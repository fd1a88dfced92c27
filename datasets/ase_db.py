"""Structures of an ASE database (``ase.db``, e.g. SQLite ``.db`` files) as contract ``Data``.

>>> ds = ASEDatabase("bulks.db", targets=["energy"], name_key="mpid")   # OC20's bulk set
>>> ds[0]   # Data(z, pos, cell [1,3,3], pbc [1,3], energy [1], y [1,1], tags, fixed, db_id, name)

Rows are listed once (``selection`` as in ``db.select``) and read on demand; the database
connection is opened lazily in the process that reads, so DataLoader workers are safe.
Energy (eV) and forces (eV/Å) come from the row when stored, tags and ``FixAtoms`` from the
structure; ``targets`` picks row values (``energy``, ``key_value_pairs`` entries, ...) into ``y``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from equiformer.data.contract import StructureError, make_data
from equiformer.datasets.trajectories import atoms_arrays
from equiformer.datasets.splits import resolve_index

__all__ = ["ASEDatabase"]


class ASEDatabase(Dataset):
    """Map-style dataset over the rows of an ASE database.

    Args:
        path: database file (``.db`` SQLite, ``.json``, ...); it must exist (``ase.db.connect``
            would silently create an empty one).
        selection: ``db.select`` selection string/ids (None: all rows).
        targets: row values stored as ``y`` [1, T] (e.g. ``["energy"]``); every row must have them.
        name_key: key-value pair stored as ``data.name`` (e.g. ``"mpid"``); default the formula.
        dtype: float dtype of positions, cell, energies and forces.
        check_overlap: reject atoms closer than 0.1 Å.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        selection: Any = None,
        targets: Sequence[str] = (),
        name_key: str | None = None,
        dtype: torch.dtype | None = None,
        check_overlap: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ASE database file")
        self.selection = selection
        self.targets = [str(t) for t in targets]
        self.name_key = name_key
        self.dtype = dtype or torch.get_default_dtype()
        self.check_overlap = bool(check_overlap)
        self._db: Any = None
        self._pid: int | None = None
        try:
            db = self._connect()
            self.ids: list[int] = [int(row.id) for row in db.select(selection)]
        except (StructureError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite/json errors of a damaged or foreign file
            raise ValueError(f"{self.path}: cannot read as an ASE database ({type(exc).__name__}: {exc})") from None
        finally:
            self._db, self._pid = None, None  # reopen lazily in the reading process

    def _connect(self) -> Any:
        from ase.db import connect

        pid = os.getpid()
        if self._db is None or self._pid != pid:
            self._db = connect(str(self.path), create_indices=False) if self.path.suffix == ".db" else connect(str(self.path))
            self._pid = pid
        return self._db

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_db"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Data:
        i = resolve_index(i, len(self), f"{self.path}:", "rows")
        row_id = self.ids[i]
        where = f"{self.path}[id={row_id}]"
        try:
            row = self._connect().get(id=row_id)
            atoms = row.toatoms()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{where}: cannot read row ({type(exc).__name__}: {exc})") from None
        arr = atoms_arrays(atoms, where)
        y = None
        if self.targets:
            values = []
            for t in self.targets:
                v = row.get(t)
                if v is None:
                    raise StructureError(f"{where}: row has no value {t!r} (targets={self.targets})")
                values.append(float(v))
            y = values
        energy = arr["energy"] if np.isfinite(arr["energy"]) else None
        forces = arr["forces"] if np.isfinite(arr["forces"]).all() else None
        name = row.get(self.name_key) if self.name_key else None
        return make_data(
            arr["z"], arr["pos"], cell=arr["cell"], pbc=arr["pbc"], y=y, energy=energy, forces=forces,
            source=where, check_overlap=self.check_overlap, dtype=self.dtype,
            tags=torch.as_tensor(arr["tags"]), fixed=torch.as_tensor(arr["fixed"]),
            db_id=torch.tensor([row_id]), name=str(name) if name is not None else row.formula,
        )

    def __repr__(self) -> str:
        return f"ASEDatabase({self.path}, {len(self)} rows, targets={self.targets})"
