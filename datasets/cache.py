"""On-disk cache of processed dataset tensors (one safetensors file per processed dataset).

A dataset turns its raw source files into a few flat tensors once (e.g. concatenated atomic
numbers and positions plus per-structure offsets) and stores them here. The file name holds a
key hashed from everything that determines the content: the source files' names, sizes and
modification times, the processing code's version constant and the processing options. A
change of any of them gives a new key, so a stale cache is never read.

Location: ``root`` argument, else ``$EQUIFORMER_CACHE/<dataset>``, else
``~/.cache/equiformer/<dataset>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: environment variable naming the base cache directory of all datasets
CACHE_ENV = "EQUIFORMER_CACHE"


def default_cache_root(dataset: str) -> Path:
    """``$EQUIFORMER_CACHE/<dataset>`` if the variable is set, else ``~/.cache/equiformer/<dataset>``."""
    base = os.environ.get(CACHE_ENV)
    return Path(base).expanduser() / dataset if base else Path.home() / ".cache" / "equiformer" / dataset


def file_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> list[list[Any]]:
    """``[[file name, size in bytes, mtime in ns], ...]`` of the source files (cheap, no hashing)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([Path(p).name, int(st.st_size), int(st.st_mtime_ns)])
    return out


def cache_key(**parts: Any) -> str:
    """16 hex digits of the SHA-256 of the JSON of ``parts`` (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_file(root: str | os.PathLike[str], stem: str, key: str) -> Path:
    """Path ``<root>/<stem>_<key>.safetensors``."""
    return Path(root) / f"{stem}_{key}.safetensors"


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` (and JSON-able ``meta``) atomically to ``path``.

    Other ``<stem>_*.safetensors`` files in the same folder (stale versions of the same
    dataset, where ``path`` is ``<stem>_<key>.safetensors``) are removed.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"meta": json.dumps(meta or {}, sort_keys=True, default=str)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared cache should follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stem = path.name.rsplit("_", 1)[0]
    for old in path.parent.glob(f"{stem}_*.safetensors"):
        if old != path and old.name.rsplit("_", 1)[0] == stem:
            try:
                old.unlink()
            except OSError:
                pass
    return path


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Read a cache file written by :func:`save_tensors`; ``None`` if absent or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception:  # a truncated or foreign file is treated as a miss and rebuilt
        return None
    return tensors, meta


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """Total payload size in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def strings_to_tensor(strings: Iterable[str]) -> tuple[Tensor, Tensor]:
    """Pack strings as UTF-8 bytes: ``(uint8 [total], offsets long [n+1])``."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    if encoded:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in encoded], dtype=torch.long), 0)
    buf = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if offsets[-1] > 0 else torch.zeros(0, dtype=torch.uint8)
    return buf.clone(), offsets


def tensor_to_string(buf: Tensor, offsets: Tensor, i: int) -> str:
    """The ``i``-th string packed by :func:`strings_to_tensor`."""
    a, b = int(offsets[i]), int(offsets[i + 1])
    return bytes(buf[a:b].numpy()).decode("utf-8")


def tensors_to_strings(buf: Tensor, offsets: Tensor) -> list[str]:
    """All strings packed by :func:`strings_to_tensor`."""
    raw = bytes(buf.numpy())
    bounds = offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
