"""Shared plumbing of the test harness: running a model, casting, graph bookkeeping, tolerances."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data

Model = Callable[[Data], Mapping[str, torch.Tensor]]

#: default (atol, rtol) per dtype; the tolerance of an output is atol + rtol * max|output|
DEFAULT_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}

#: keys that describe the batch structure, never permuted or cast
BATCH_KEYS = ("batch", "ptr")


def tolerance(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(atol, rtol) with the per-dtype defaults filled in."""
    d_atol, d_rtol = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE[torch.float32])
    return (d_atol if atol is None else float(atol)), (d_rtol if rtol is None else float(rtol))


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a CPU generator seeded with ``seed`` (0 when None)."""
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def is_index_key(key: str) -> bool:
    """PyG's convention: keys holding node indices (incremented when batching)."""
    return "index" in key or key == "face"


def cast_data(data: Data, dtype: torch.dtype | None) -> Data:
    """A shallow copy of ``data`` with floating tensors cast to ``dtype`` (a copy even if None)."""
    out = copy.copy(data)
    if dtype is None:
        return out
    for key in out.keys():
        value = out[key]
        if torch.is_tensor(value) and value.is_floating_point():
            out[key] = value.to(dtype)
    return out


def prepare_model(model: Model, dtype: torch.dtype | None) -> Model:
    """``model`` itself, or a deep copy cast to ``dtype`` (the caller's model is left untouched)."""
    if dtype is None or not isinstance(model, torch.nn.Module):
        return model
    return copy.deepcopy(model).to(dtype)


@contextlib.contextmanager
def eval_mode(model: Model) -> Iterator[None]:
    """Run an ``nn.Module`` in eval mode (no dropout) and restore its mode afterwards."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_model(model: Model, data: Data, what: str = "model") -> dict[str, torch.Tensor]:
    """``model(data)`` with autograd enabled (force models need it); outputs detached."""
    out = model(data)
    if not isinstance(out, Mapping):
        raise TypeError(f"{what} must return a dict of named tensors, got {type(out).__name__}")
    result = {}
    for key, value in out.items():
        if torch.is_tensor(value):
            result[key] = value.detach()
    return result


def float_dtype(data: Data) -> torch.dtype:
    """The floating dtype of the structure (that of ``pos``)."""
    return data.pos.dtype


def graph_info(data: Data) -> tuple[int, int, torch.Tensor]:
    """(num_nodes, num_graphs, batch [N]) of a Data (one graph) or a Batch."""
    n = int(data.pos.shape[0])
    batch = data.batch if isinstance(data, Batch) or getattr(data, "batch", None) is not None else None
    if batch is None:
        return n, 1, torch.zeros(n, dtype=torch.long, device=data.pos.device)
    num_graphs = int(data.num_graphs) if isinstance(data, Batch) else int(batch.max()) + 1 if n else 1
    return n, num_graphs, batch


def node_keys(data: Data, num_nodes: int) -> list[str]:
    """Keys of per-node tensor fields: first dim == num_nodes (index/edge fields and ptr excluded)."""
    keys = []
    for key in data.keys():
        value = data[key]
        if key == "ptr" or is_index_key(key) or "edge" in key:
            continue
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_nodes:
            keys.append(key)
    return keys


def fmt_array(x: Any, precision: int = 4, max_items: int = 12) -> str:
    """Compact one-line rendering of a small array/tensor for error messages."""
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.size > max_items and a.ndim == 1:
        head = np.array2string(a[:max_items], precision=precision, separator=", ", suppress_small=True)
        return head[:-1] + f", ... ({a.size} in all)]"
    return np.array2string(a, precision=precision, separator=", ", suppress_small=True, max_line_width=10_000).replace(
        "\n", ""
    )


def as_rows(value: torch.Tensor, leading: int, dim: int, name: str, spec: str) -> torch.Tensor:
    """Reshape an output to [leading, dim]; raises ValueError when its size does not fit ``spec``."""
    if value.dim() == 0:
        value = value.reshape(1)
    if value.numel() != leading * dim:
        raise ValueError(
            f"output {name!r} has shape {tuple(value.shape)}, which does not hold {leading} rows of "
            f"{spec} (dimension {dim}); check the irreps you declared for it"
        )
    return value.reshape(leading, dim)


def classify_leading(value: torch.Tensor, name: str, num_nodes: int, num_graphs: int) -> str:
    """'atom' if the output's leading dim is num_nodes, 'graph' if num_graphs; ValueError otherwise."""
    lead = 1 if value.dim() == 0 else int(value.shape[0])
    if lead == num_nodes and num_nodes != num_graphs:
        return "atom"
    if lead == num_graphs:
        return "graph"
    if lead == num_nodes:
        return "atom"
    raise ValueError(
        f"output {name!r} has shape {tuple(value.shape)}: its leading dimension {lead} is neither the number "
        f"of atoms ({num_nodes}) nor the number of graphs ({num_graphs})"
    )
