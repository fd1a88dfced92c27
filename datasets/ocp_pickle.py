"""Restricted unpickling of the values stored in fairchem/OCP LMDB files.

Every value of an OC20 LMDB is ``pickle.dumps(torch_geometric.data.Data(...))``. Plain
``pickle.loads`` on such bytes would run whatever the pickle says (``os.system`` and the
like), and so would ``torch.load(weights_only=False)``, which a pickled tensor calls for its
storage bytes (``torch.storage._load_from_bytes``). A downloaded LMDB is untrusted input, so
:func:`safe_loads` uses :class:`RestrictedUnpickler`, whose ``find_class`` hands out only
the names needed to rebuild a ``Data`` and refuses everything else with
:class:`UnsafePickleError` naming the file, key and the refused global.

Allowed names (nothing else can be called while unpickling):

- torch: ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` (only without backward
  hooks), ``torch.storage._load_from_bytes`` replaced by a version that reads the storage
  with ``torch.load(..., weights_only=True)``, ``torch.Size``, ``torch.<dtype>`` (dtype
  objects only), ``torch._tensor._rebuild_from_type_v2`` (plain ``torch.Tensor`` only);
- torch_geometric: ``Data``, ``GlobalStorage``, ``DataEdgeAttr``, ``DataTensorAttr``
  (PyG >= 2 pickles; PyG 1.x pickles name only ``Data``);
- numpy: ``ndarray``, ``dtype`` and the ``numpy.dtypes.*DType`` classes,
  ``_reconstruct``, ``scalar`` and ``_frombuffer`` (under ``numpy.core`` or ``numpy._core``);
- builtins: ``collections.OrderedDict``, ``set``, ``frozenset``, ``slice``, ``complex``,
  ``_codecs.encode`` (latin-1 only: protocol-2 pickles of ``bytes`` use it) and
  ``copyreg._reconstructor`` (protocol 0/1 objects; its class argument must itself be allowed).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

import torch

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "allowed_globals", "ocp_fields", "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (or was otherwise refused)."""


def _safe_load_from_bytes(b: bytes) -> Any:
    """Storage bytes of a pickled tensor, read with torch's weights-only unpickler."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _safe_rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                            backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    if backward_hooks:
        raise UnsafePickleError("pickled tensor carries backward hooks (callables); refused")
    from torch._utils import _rebuild_tensor_v2

    return _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, {}, metadata)


def _safe_rebuild_from_type_v2(func: Callable, new_type: Any, args: Any, state: Any) -> Any:
    if new_type is not torch.Tensor or func not in (_safe_rebuild_tensor_v2,):
        raise UnsafePickleError(f"pickled tensor of type {new_type!r} rebuilt by {func!r}; only plain torch.Tensor is allowed")
    from torch._tensor import _rebuild_from_type_v2

    return _rebuild_from_type_v2(func, new_type, args, state)


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused (pickles of bytes use latin1)")
    if not isinstance(obj, str):
        raise UnsafePickleError("_codecs.encode of a non-string refused")
    return obj.encode("latin1", errors)


def _numpy_attr(*paths: str) -> Any:
    import importlib

    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def allowed_globals() -> dict[tuple[str, str], Any]:
    """``{(module, name): object}`` that :class:`RestrictedUnpickler` may return."""
    import collections

    import numpy as np
    from torch_geometric.data import data as pyg_data
    from torch_geometric.data import storage as pyg_storage

    from torch._utils import _rebuild_tensor

    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor_v2,
        ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type_v2,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("torch", "Size"): torch.Size,
        ("torch_geometric.data.data", "Data"): pyg_data.Data,
        ("torch_geometric.data.storage", "GlobalStorage"): pyg_storage.GlobalStorage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("DataEdgeAttr", "DataTensorAttr"):
        if hasattr(pyg_data, name):
            table[("torch_geometric.data.data", name)] = getattr(pyg_data, name)
    reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    for core in ("numpy.core", "numpy._core"):
        if reconstruct is not None:
            table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        if scalar is not None:
            table[(f"{core}.multiarray", "scalar")] = scalar
        if frombuffer is not None:
            table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


_TABLE: dict[tuple[str, str], Any] | None = None


def _table() -> dict[tuple[str, str], Any]:
    global _TABLE
    if _TABLE is None:
        _TABLE = allowed_globals()
    return _TABLE


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allow-listed globals (module docstring).

    Args:
        file: binary file-like object holding the pickle.
        source: name used in error messages (e.g. ``"data.0000.lmdb[key 12]"``).
    """

    def __init__(self, file: Any, source: str = "pickle") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        table = _table()
        obj = table.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes

            cls = getattr(numpy.dtypes, name, None)
            if isinstance(cls, type):
                return cls
        if module == "copyreg" and name == "_reconstructor":
            return self._reconstructor
        raise UnsafePickleError(
            f"{self.source}: refused to unpickle global {module}.{name}: only the torch / torch_geometric / numpy "
            "classes needed to rebuild an OCP Data object are allowed (is this file an OC20 LMDB?)"
        )

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        allowed = {v for v in _table().values() if isinstance(v, type)}
        if cls not in allowed or base not in (object, *allowed):
            raise UnsafePickleError(f"{self.source}: copyreg._reconstructor of {cls!r} refused")
        import copyreg

        return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise UnsafePickleError(f"{self.source}: pickle uses persistent ids ({pid!r}); refused")


def safe_loads(data: bytes, source: str = "pickle") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: the pickle refers to a global outside the allow-list.
        ValueError: the bytes are not a readable pickle (message names ``source``).
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated/corrupt bytes: one clear line
        raise ValueError(f"{source}: cannot unpickle the stored value ({type(exc).__name__}: {exc})") from None


def ocp_fields(obj: Any, source: str = "pickle") -> dict[str, Any]:
    """The attributes of an unpickled OCP object as a plain ``{name: value}`` dict.

    Handles PyG >= 2 ``Data`` (attributes in ``_store``), PyG 1.x ``Data`` (attributes
    directly in ``__dict__``, as in the original OC20 LMDBs) and plain dicts.
    """
    from torch_geometric.data import Data

    if isinstance(obj, Data):
        d = obj.__dict__
        if "_store" in d:
            return {k: obj[k] for k in obj.keys()}
        return {k: v for k, v in d.items() if not (k.startswith("__") and k.endswith("__")) and v is not None}
    if isinstance(obj, dict):
        return dict(obj)
    raise ValueError(f"{source}: stored value is a {type(obj).__name__}, not a torch_geometric Data object")
