"""fairchem-core 1.x's EquiformerV2 as a benchmark peer, with the same architecture as ours.

Used by ``bench_equiformer_v2.py --impl fairchem``. fairchem-core 1.10.0 (the last release with
EquiformerV2; 2.x dropped it) is not installed in our environment: the benchmark puts its wheel on
``PYTHONPATH`` (see ``benchmarks/gpu_eqv2.sh``).

Importing ``fairchem.core.models.equiformer_v2`` pulls in the whole package (datasets, trainers,
relaxations), which imports modules the model never calls. Where those are missing,
:func:`install_stubs` puts tiny stand-ins into ``sys.modules`` instead of carrying large wheels:

* ``torch_scatter`` (compiled, no wheel for recent torch): ``scatter`` on top of
  ``torch_geometric.utils.scatter`` (the model's forward does not call it);
* ``matplotlib`` (``common/utils.py`` imports ``Figure`` / ``FigureCanvasAgg`` for plotting helpers);
* ``huggingface_hub`` and ``pydantic`` (the pretrained-checkpoint registry, ``models/model_registry.py``).

Real dependencies it does need beyond the GPU image: ``ase`` and ``lmdb`` (imported by its dataset
modules), carried as wheels. The stubs are installed only for modules that cannot be imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FairchemEquiformerV2", "fairchem_kwargs", "install_stubs"]


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install_stubs() -> list[str]:
    """Put stand-ins for fairchem's unneeded imports into ``sys.modules``; returns their names."""
    for real in ("torchmetrics", "lightning"):  # decide their optional-dependency checks before any stub exists
        try:
            __import__(real)
        except ImportError:
            pass
    made: list[str] = []
    if _missing("torch_scatter"):
        from torch_geometric.utils import scatter as pyg_scatter

        mod = types.ModuleType("torch_scatter")

        def scatter(src: Tensor, index: Tensor, dim: int = -1, out: Tensor | None = None,
                    dim_size: int | None = None, reduce: str = "sum") -> Tensor:
            if out is not None:
                raise NotImplementedError("torch_scatter stand-in: out= is not supported")
            return pyg_scatter(src, index, dim=dim % src.dim(), dim_size=dim_size, reduce=reduce)

        mod.scatter = scatter  # type: ignore[attr-defined]
        sys.modules["torch_scatter"] = mod
        made.append("torch_scatter")
    if _missing("matplotlib"):
        for name in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg", "matplotlib.figure"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["matplotlib.backends.backend_agg"].FigureCanvasAgg = type("FigureCanvasAgg", (), {})  # type: ignore[attr-defined]
        sys.modules["matplotlib.figure"].Figure = type("Figure", (), {})  # type: ignore[attr-defined]
        made.append("matplotlib")
    if _missing("huggingface_hub"):
        mod = types.ModuleType("huggingface_hub")

        def hf_hub_download(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("huggingface_hub stand-in: no downloads in the benchmark")

        mod.hf_hub_download = hf_hub_download  # type: ignore[attr-defined]
        sys.modules["huggingface_hub"] = mod
        made.append("huggingface_hub")
    if _missing("pydantic"):
        mod = types.ModuleType("pydantic")

        class BaseModel:
            def __init__(self, **kwargs: Any) -> None:
                self.__dict__.update(kwargs)

        mod.BaseModel = BaseModel  # type: ignore[attr-defined]
        mod.AnyUrl = type("AnyUrl", (str,), {})  # type: ignore[attr-defined]
        sys.modules["pydantic"] = mod
        made.append("pydantic")
    return made


def fairchem_kwargs(cfg: dict[str, Any], strict_neighbors: bool = False) -> dict[str, Any]:
    """Arguments of fairchem's ``equiformer_v2`` model (the paper's S2EF configs) for our config.

    ``cfg`` is ``EquiformerV2(...).config``. fairchem's Gaussian distance basis always has 600
    functions (its ``num_distance_basis`` is unused), so ``cfg["num_radial_basis"]`` must be 600
    for the two models to have the same size.
    """
    if cfg["activation"] not in ("s2", "gate"):
        raise ValueError(f"no fairchem equivalent of activation {cfg['activation']!r}")
    if not cfg["direct_forces"]:
        raise ValueError("fairchem's equiformer_v2 (the paper's S2EF configs) predicts direct forces only")
    if int(cfg["num_radial_basis"]) != 600:
        raise ValueError(f"fairchem's EquiformerV2 has 600 radial basis functions; ours has {cfg['num_radial_basis']}")
    grid = cfg["grid_resolution"]
    if isinstance(grid, (list, tuple)):
        raise ValueError("fairchem takes one grid_resolution (square grid)")
    return {
        "use_pbc": True,
        "regress_forces": bool(cfg["regress_forces"]),
        "otf_graph": True,
        "max_neighbors": int(cfg["max_neighbors"]) if cfg["max_neighbors"] else 100000,
        "max_radius": float(cfg["cutoff"]),
        "max_num_elements": int(cfg["max_num_elements"]),
        "num_layers": int(cfg["num_layers"]),
        "sphere_channels": int(cfg["sphere_channels"]),
        "attn_hidden_channels": int(cfg["attn_hidden_channels"]),
        "num_heads": int(cfg["num_heads"]),
        "attn_alpha_channels": int(cfg["attn_alpha_channels"]),
        "attn_value_channels": int(cfg["attn_value_channels"]),
        "ffn_hidden_channels": int(cfg["ffn_hidden_channels"]),
        "norm_type": "layer_norm_sh",
        "lmax_list": [int(cfg["lmax"])],
        "mmax_list": [int(cfg["mmax"])],
        "grid_resolution": int(grid),
        "num_sphere_samples": 128,
        "edge_channels": int(cfg["edge_channels"]),
        "use_atom_edge_embedding": bool(cfg["use_atom_edge_embedding"]),
        "distance_function": "gaussian",
        "attn_activation": "silu",
        "use_s2_act_attn": False,
        "use_attn_renorm": bool(cfg["use_attn_renorm"]),
        "ffn_activation": "silu",
        "use_gate_act": cfg["activation"] == "gate",
        "use_grid_mlp": bool(cfg["ffn_grid_mlp"]),
        "use_sep_s2_act": True,
        "alpha_drop": float(cfg["alpha_drop"]),
        "drop_path_rate": float(cfg["drop_path_rate"]),
        "proj_drop": 0.0,
        "weight_init": "uniform",
        "enforce_max_neighbors_strictly": bool(strict_neighbors),
        "avg_num_nodes": float(cfg["avg_num_nodes"]),
        "avg_degree": float(cfg["avg_degree"]),
    }


class FairchemEquiformerV2(nn.Module):
    """fairchem's (deprecated single-class, as in the paper's configs) ``EquiformerV2``, taking our
    contract batches: ``forward(batch) -> {"energy": [B], "forces": [N, 3]}``."""

    def __init__(self, cfg: dict[str, Any], strict_neighbors: bool = False) -> None:
        super().__init__()
        self.stubs = install_stubs()
        import logging

        logging.getLogger().setLevel(logging.ERROR)  # its deprecation warnings
        from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as FC

        self.kwargs = fairchem_kwargs(cfg, strict_neighbors)
        self.model = FC(**self.kwargs)

    @staticmethod
    def to_fairchem(batch: Any) -> Any:
        """A shallow copy of a contract batch with the fields fairchem reads."""
        data = batch.clone()
        data.atomic_numbers = batch.z.long()
        data.natoms = torch.bincount(batch.batch, minlength=int(batch.num_graphs))
        data.cell = batch.cell.reshape(-1, 3, 3)
        data.pbc = batch.pbc.reshape(-1, 3)
        data.tags = torch.zeros_like(batch.z)
        data.fixed = torch.zeros_like(batch.z)
        return data

    def num_edges(self, data: Any) -> int:
        graph = self.model.generate_graph(data, enforce_max_neighbors_strictly=self.model.enforce_max_neighbors_strictly)
        return int(graph.edge_index.shape[1])

    def forward(self, data: Any) -> dict[str, Tensor]:
        out = self.model(data)
        return {"energy": out["energy"].reshape(-1), "forces": out["forces"]}
