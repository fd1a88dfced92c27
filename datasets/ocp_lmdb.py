"""Read (and write) LMDB files in the fairchem/OCP format, safely and from many workers.

Format (as written by fairchem's ``preprocess_ef.py`` and shipped in the OC20 IS2RE and
S2EF-test tarballs): one LMDB file (``subdir=False``) per shard, keys ``b"0"``, ``b"1"``, ...
(ASCII integers), values ``pickle.dumps(torch_geometric.data.Data)``, and optionally a key
``b"length"`` holding the pickled number of entries. A dataset is either one ``.lmdb`` file or
a folder of shards (``data.0000.lmdb``, ``data.0001.lmdb``, ...; read in sorted order).

:class:`LMDBShards` opens every file read-only and memory-mapped
(``lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False)``)
lazily, in the process that reads: a ``DataLoader`` worker (fork or spawn) never uses an
environment opened by its parent, so any number of workers is safe. Values are decoded with
the restricted unpickler of :mod:`equiformer.datasets.ocp_pickle` (never plain ``pickle``).

``lmdb`` is an optional dependency: ``pip install lmdb`` (or ``pip install "equiformer[oc20]"``).
"""

from __future__ import annotations

import bisect
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from equiformer.datasets.ocp_pickle import safe_loads
from equiformer.datasets.splits import resolve_index

__all__ = ["LMDB_INSTALL_HINT", "LMDBShards", "find_lmdb_files", "require_lmdb", "write_lmdb"]

LMDB_INSTALL_HINT = 'pip install lmdb  (or: pip install "equiformer[oc20]")'
_LENGTH_KEY = b"length"


def require_lmdb() -> Any:
    """Import and return the ``lmdb`` module, or raise ImportError with the install hint."""
    try:
        import lmdb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading OC20 LMDB files needs the 'lmdb' package: {LMDB_INSTALL_HINT}") from exc
    return lmdb


def find_lmdb_files(path: str | os.PathLike[str]) -> list[Path]:
    """``[path]`` for a file, the sorted ``*.lmdb`` files for a folder.

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no ``.lmdb`` file.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(q for q in p.glob("*.lmdb") if q.is_file())
        if not files:
            raise FileNotFoundError(f"{p}: folder holds no *.lmdb file (expected OCP shards such as data.0000.lmdb)")
        return files
    raise FileNotFoundError(f"{p}: no such LMDB file or folder")


def _open(lmdb: Any, path: Path) -> Any:
    try:
        return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=2048)
    except lmdb.Error as exc:
        raise ValueError(f"{path}: not a readable LMDB file ({exc})") from None


class LMDBShards:
    """Entries of one or several OCP LMDB shards, indexed ``0 .. len-1`` across shards in order.

    Args:
        path: an ``.lmdb`` file or a folder of them.

    The constructor opens each shard once to count its entries (``length`` key if present,
    else the number of entries) and closes it again; :meth:`get` reopens lazily per process.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.lmdb = require_lmdb()
        self.path = Path(path).expanduser()
        self.files = find_lmdb_files(self.path)
        self.lengths: list[int] = []
        for f in self.files:
            env = _open(self.lmdb, f)
            try:
                self.lengths.append(self._count(env, f))
            finally:
                env.close()
        self.offsets: list[int] = []
        total = 0
        for n in self.lengths:
            total += n
            self.offsets.append(total)
        self._envs: list[Any] | None = None
        self._pid: int | None = None

    def _count(self, env: Any, f: Path) -> int:
        with env.begin() as txn:
            raw = txn.get(_LENGTH_KEY)
            entries = int(env.stat()["entries"])
        if raw is None:
            return entries
        try:
            n = safe_loads(raw, f"{f}[key 'length']")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{f}: unreadable 'length' entry ({exc})") from None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{f}: 'length' entry is {n!r}, expected a non-negative integer")
        if n > entries:
            raise ValueError(f"{f}: 'length' says {n} entries but the file holds only {entries} keys")
        return n

    def __len__(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_envs"], state["_pid"] = None, None  # environments never cross processes
        state.pop("lmdb", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lmdb = require_lmdb()

    def _environments(self) -> list[Any]:
        pid = os.getpid()
        if self._envs is None or self._pid != pid:
            if self._envs is not None:
                # inherited through fork: never use the parent's handles; close the child's copies
                # (unmaps in this process only; lmdb refuses a second open of a path still open here)
                for env in self._envs:
                    try:
                        env.close()
                    except Exception:  # noqa: BLE001
                        pass
            self._envs = [_open(self.lmdb, f) for f in self.files]
            self._pid = pid
        return self._envs

    def close(self) -> None:
        """Close the environments opened by this process (they reopen on the next read)."""
        if self._envs is not None and self._pid == os.getpid():
            for env in self._envs:
                env.close()
        self._envs, self._pid = None, None

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, key within the shard) of global index ``i``."""
        i = resolve_index(i, len(self), f"{self.path}:", "entries")
        shard = bisect.bisect_right(self.offsets, i)
        start = self.offsets[shard - 1] if shard else 0
        return shard, i - start

    def source(self, i: int) -> str:
        """``"<file>[key k]"`` of global index ``i`` (for messages)."""
        shard, key = self.locate(i)
        return f"{self.files[shard]}[key {key}]"

    def get_bytes(self, i: int) -> bytes:
        """Raw pickled value of entry ``i``."""
        shard, key = self.locate(i)
        env = self._environments()[shard]
        with env.begin(buffers=False) as txn:
            raw = txn.get(str(key).encode("ascii"))
        if raw is None:
            raise KeyError(f"{self.files[shard]}: no entry with key {key!r} (file holds {self.lengths[shard]} entries "
                           "by its count; keys must be 0..n-1)")
        return bytes(raw)

    def get(self, i: int) -> Any:
        """Entry ``i`` unpickled with the restricted unpickler."""
        return safe_loads(self.get_bytes(i), self.source(i))


def write_lmdb(path: str | os.PathLike[str], objects: Iterable[Any], map_size: int = 1 << 40,
               protocol: int = pickle.HIGHEST_PROTOCOL) -> int:
    """Write ``objects`` (pickled) under keys ``0..n-1`` plus ``length`` into one LMDB file.

    The OCP layout (see the module docstring). Returns the number of entries written.
    An existing file at ``path`` is replaced.
    """
    lmdb = require_lmdb()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, Path(str(path) + "-lock")):
        if p.exists():
            p.unlink()
    env = lmdb.open(str(path), subdir=False, map_size=map_size, meminit=False, map_async=True)
    n = 0
    try:
        txn = env.begin(write=True)
        for obj in objects:
            txn.put(str(n).encode("ascii"), pickle.dumps(obj, protocol=protocol))
            n += 1
            if n % 1000 == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.put(_LENGTH_KEY, pickle.dumps(n, protocol=protocol))
        txn.commit()
        env.sync()
    finally:
        env.close()
    lock = Path(str(path) + "-lock")
    if lock.exists():
        lock.unlink()
    return n
