"""LightningModule that trains a network to predict graph-level properties (e.g. QM9 targets).

The network predicts *normalised* targets. For target ``t`` of a graph with ``N`` atoms ``z``::

    y_norm = (y - sum_atoms atomref[t, z] - mean[t] - N * mean_per_atom[t]) / std[t]
    y      = out * std[t] + mean[t] + N * mean_per_atom[t] + sum_atoms atomref[t, z]

Each target is normalised either *per molecule* (``mean`` = training mean after the atomref
subtraction, ``mean_per_atom = 0``, ``std`` its std: the default, as before) or *per atom*
(``mean = 0``, ``mean_per_atom`` = training mean of (y - atomrefs) / N, ``std`` = std of the
residual y - atomrefs - N * mean_per_atom), chosen with ``normalize``. Per-atom normalisation
suits extensive targets such as QM9's U0 atomization energy, whose per-molecule mean (-76 eV,
std 10 eV) puts methane ~5 std from the mean while the per-atom residual has std 3.2 eV.

``mean``, ``mean_per_atom``, ``std`` (training-split statistics after the atomref subtraction)
and ``atomref`` come from the datamodule in :meth:`PropertyTask.setup` (``atomrefs()`` [T, 119],
``train_statistics(per_atom=...)``) or from the ``normalization`` argument. They live in float64
buffers (checkpoints carry them) and, as plain lists, in the hyper-parameters, together with
the model's full constructor config, the target names, units and report units, so a
checkpoint can be turned into a model with ``torch.load(weights_only=True)`` and no pickled
code (see :meth:`PropertyTask.export_metadata`).

Training: L1 (default, as in the Equiformer paper) or MSE loss on normalised targets, AdamW
(no weight decay on biases, 1-D weights and ``model.no_weight_decay()``), linear warm-up +
cosine schedule stepped per optimizer step, optional EMA of the weights; validation and
test use the EMA weights when kept. Logged: ``train/loss``, ``train/lr``,
``train/molecules_per_s``, ``val/loss``, ``val/mae_norm`` (mean over targets of the MAE in
units of each target's std; the checkpoint monitor) and ``val/<target>_mae_<report unit>``
(e.g. ``val/homo_mae_meV``); the same under ``test/``.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import RandomSampler

from equiformer.hub import clamp_to_minimum, minimum_row
from equiformer.tasks.datamodule import NORMALIZATION_MODES, target_statistics
from equiformer.tasks.ema import EMAWeights
from equiformer.tasks.metrics import PerTargetMAE, mae_key
from equiformer.tasks.schedulers import adamw_warmup_cosine

__all__ = ["PropertyTask", "NUM_ELEMENTS"]

#: rows of an atomref table: index = atomic number, 0..118
NUM_ELEMENTS = 119

_LOSSES = ("l1", "mse")


def _plain_floats(x: Any) -> Any:
    """Tensor/array/sequence -> nested lists of Python floats."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).tolist()
    if hasattr(x, "tolist"):
        return [float(v) for v in x.tolist()] if getattr(x, "ndim", 1) == 1 else x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain_floats(v) for v in x]
    return float(x)


def _stat(stats: Any, key: str) -> Any:
    """``stats[key]`` or ``stats.key`` (datamodules may return a dict or an object)."""
    if isinstance(stats, Mapping):
        return stats[key]
    if isinstance(stats, (tuple, list)) and len(stats) == 2:  # (mean, std)
        return stats[("mean", "std").index(key)]
    return getattr(stats, key)


class PropertyTask(pl.LightningModule):
    """Regression of graph-level properties with an equivariant network.

    Args:
        model: registry name for :func:`equiformer.models.build_model`.
        model_kwargs: constructor arguments of the network (e.g. ``{"preset": "small"}``); the
            number of outputs is set from ``targets``. After construction the hyper-parameters
            hold the network's full ``config``.
        targets: target names in output order, e.g. ``["homo"]`` (must equal the datamodule's).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, 1-D weights, norms).
        betas: AdamW betas.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        warmup_steps: warm-up length in optimizer steps; overrides ``warmup_epochs`` when set.
        warmup_start_lr: learning rate at the first step of the warm-up.
        min_lr: learning rate at the end of the cosine.
        max_epochs: length of the cosine in epochs; default: the trainer's whole run
            (``max_epochs``/``max_steps``).
        ema_decay: decay of the exponential moving average of the weights used for
            validation, test and prediction; ``None`` keeps no average.
        loss: ``"l1"`` (paper) or ``"mse"``, on normalised targets.
        normalize: how each target is standardised: ``None`` or ``"per_molecule"`` (all per
            molecule, the behaviour of earlier versions), ``"per_atom"`` (all per atom),
            ``"auto"`` (per atom for targets whose target info is ``extensive``, e.g. QM9's
            U0/U/H/G/zpve) or ``{target: "per_atom" | "per_molecule"}`` (others per molecule).
        normalization: ``{"mean": [T], "std": [T], "atomref": [T][119], "mean_per_atom": [T],
            "mode": [T]}`` in target units (the last three optional); default: computed from
            the datamodule in :meth:`setup`. Checkpoints record it.
        target_info: ``{name: {"unit", "report_unit", "report_scale", "description"}}``;
            default: from the datamodule's ``target_infos``. Checkpoints record it.
    """

    def __init__(
        self,
        model: str = "equiformer",
        model_kwargs: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        warmup_steps: int | None = None,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-6,
        max_epochs: int | None = None,
        ema_decay: float | None = 0.999,
        loss: str = "l1",
        normalize: str | dict[str, str] | None = None,
        normalization: dict[str, Any] | None = None,
        target_info: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        targets = list(targets) if targets is not None else ["homo"]
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"PropertyTask: targets must be a non-empty list of names, got {targets!r}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"PropertyTask: duplicate targets {targets}")
        if loss not in _LOSSES:
            raise ValueError(f"PropertyTask: unknown loss {loss!r}; choose one of {list(_LOSSES)}")
        if lr <= 0 or min_lr < 0 or warmup_start_lr < 0:
            raise ValueError(f"PropertyTask: learning rates must be positive (lr={lr}, min_lr={min_lr}, warmup_start_lr={warmup_start_lr})")
        self._normalize_spec = self._check_normalize(normalize, targets)
        self.save_hyperparameters()
        self.hparams["targets"] = targets
        self.hparams["betas"] = [float(b) for b in betas]
        self.targets = targets
        T = len(targets)

        from equiformer.models import build_model

        kwargs = dict(model_kwargs or {})
        self.model = build_model(model, **self._with_num_outputs(model, kwargs, T))
        config = getattr(self.model, "config", None)
        if isinstance(config, Mapping):
            self.hparams["model_kwargs"] = dict(config)  # the full constructor config, JSON-able by contract
        self.ema = EMAWeights(self.model, decay=ema_decay) if ema_decay is not None else None

        # normalisation (float64: QM9 energies are ~1e4 eV totals; float32 would cost ~1 meV)
        self.register_buffer("target_mean", torch.zeros(T, dtype=torch.float64))
        self.register_buffer("target_std", torch.ones(T, dtype=torch.float64))
        self.register_buffer("atomref", torch.zeros(T, NUM_ELEMENTS, dtype=torch.float64))
        # not persistent: checkpoints of earlier versions have no such entry; the value travels
        # in hparams["normalization"] (restored by __init__ on load) like the other statistics
        self.register_buffer("target_mean_per_atom", torch.zeros(T, dtype=torch.float64), persistent=False)
        #: "per_molecule" or "per_atom" for each target (how the statistics were computed)
        self.normalization_modes: list[str] = ["per_molecule"] * T
        self._normalization_ready = False
        self.target_info: dict[str, dict[str, Any]] = {}
        if target_info is not None:
            self.set_target_info(target_info)
        if normalization is not None:
            if not isinstance(normalization, Mapping) or "mean" not in normalization or "std" not in normalization:
                raise ValueError("PropertyTask: normalization must be {'mean': [T], 'std': [T], 'atomref': [T][119] (optional), "
                                 "'mean_per_atom': [T] (optional), 'mode': [T] (optional)}")
            mode = normalization.get("mode")
            explicit = self._explicit_modes() if self._normalize_spec is not None else None
            if mode is not None and explicit is not None and list(mode) != explicit:
                raise ValueError(f"PropertyTask: normalize={normalize!r} asks for modes {explicit} but normalization "
                                 f"was computed for {list(mode)}")
            self.set_normalization(normalization["mean"], normalization["std"], normalization.get("atomref"),
                                   mean_per_atom=normalization.get("mean_per_atom"), mode=mode)

        self.val_mae = PerTargetMAE(T)
        self.test_mae = PerTargetMAE(T)
        #: molecules in the last val/test evaluation of this process, by stage
        self.eval_counts: dict[str, int] = {}
        self._t_last: float | None = None
        self._epoch_t0: float | None = None
        self._epoch_molecules = 0

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _with_num_outputs(model: str, kwargs: dict[str, Any], num_targets: int) -> dict[str, Any]:
        """Set the network's ``num_targets`` (width of its ``y``) from the task's targets."""
        if "num_targets" in kwargs and int(kwargs["num_targets"]) != num_targets:
            raise ValueError(f"PropertyTask: model_kwargs.num_targets={kwargs['num_targets']} disagrees with "
                             f"{num_targets} target(s)")
        return {**kwargs, "num_targets": num_targets}

    @staticmethod
    def _check_normalize(spec: Any, targets: list[str]) -> str | dict[str, str] | None:
        """Validate ``normalize``: returns None, ``"per_molecule"``, ``"per_atom"``, ``"auto"`` or ``{target: mode}``."""
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec not in (*NORMALIZATION_MODES, "auto"):
                raise ValueError(f"PropertyTask: unknown normalize={spec!r}; choose one of "
                                 f"{[*NORMALIZATION_MODES, 'auto']} or give {{target: mode}}")
            return spec
        if isinstance(spec, Mapping):
            unknown = [t for t in spec if t not in targets]
            if unknown:
                raise ValueError(f"PropertyTask: normalize names {unknown}, which are not targets ({targets})")
            bad = {t: m for t, m in spec.items() if m not in NORMALIZATION_MODES}
            if bad:
                raise ValueError(f"PropertyTask: normalize modes must be one of {list(NORMALIZATION_MODES)}, got {bad}")
            return {str(t): str(m) for t, m in spec.items()}
        raise ValueError(f"PropertyTask: normalize must be a mode name, 'auto' or {{target: mode}}, got {spec!r}")

    def _explicit_modes(self) -> list[str] | None:
        """Per-target modes when ``normalize`` names them (None for ``"auto"``, resolved in :meth:`resolve_modes`)."""
        spec = self._normalize_spec
        if spec == "auto":
            return None
        if spec is None:  # not asked: per molecule, as before the option
            return ["per_molecule"] * len(self.targets)
        if isinstance(spec, str):
            return [spec] * len(self.targets)
        return [spec.get(t, "per_molecule") for t in self.targets]

    def resolve_modes(self) -> list[str]:
        """Per-target normalisation modes asked for by ``normalize`` (``"auto"``: from ``target_info``)."""
        explicit = self._explicit_modes()
        if explicit is not None:
            return explicit
        if not self.target_info:
            raise ValueError("PropertyTask: normalize='auto' needs target metadata (target_info= or a datamodule "
                             "with target_infos) to know which targets are extensive")
        return ["per_atom" if self.target_info.get(t, {}).get("extensive") else "per_molecule" for t in self.targets]

    def set_normalization(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                          atomref: Sequence[Sequence[float]] | Tensor | None = None,
                          mean_per_atom: Sequence[float] | Tensor | None = None,
                          mode: Sequence[str] | None = None) -> None:
        """Set the [T] mean and std, the [T, 119] atomref table and the [T] per-atom mean (target units).

        ``mode`` records per target how the statistics were made (``"per_molecule"`` /
        ``"per_atom"``); default: ``"per_atom"`` where ``mean_per_atom`` is non-zero.
        """
        T = len(self.targets)
        mean_t = torch.as_tensor(_plain_floats(mean), dtype=torch.float64).reshape(-1)
        std_t = torch.as_tensor(_plain_floats(std), dtype=torch.float64).reshape(-1)
        if mean_t.numel() != T or std_t.numel() != T:
            raise ValueError(f"normalization: need one mean and one std per target ({T}: {self.targets}), "
                             f"got {mean_t.numel()} and {std_t.numel()}")
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ValueError(f"normalization: mean must be finite and std positive, got mean={mean_t.tolist()}, std={std_t.tolist()}")
        if atomref is None:
            ref = torch.zeros(T, NUM_ELEMENTS, dtype=torch.float64)
        else:
            ref = torch.as_tensor(_plain_floats(atomref), dtype=torch.float64)
            if ref.dim() == 1 and T == 1:
                ref = ref[None]
            if ref.shape != (T, NUM_ELEMENTS):
                raise ValueError(f"normalization: atomref must be [{T}, {NUM_ELEMENTS}] (targets x atomic number), got {tuple(ref.shape)}")
        if mean_per_atom is None:
            mpa = torch.zeros(T, dtype=torch.float64)
        else:
            mpa = torch.as_tensor(_plain_floats(mean_per_atom), dtype=torch.float64).reshape(-1)
            if mpa.numel() != T or not torch.isfinite(mpa).all():
                raise ValueError(f"normalization: mean_per_atom must hold {T} finite numbers, got {mpa.tolist()}")
        if mode is None:
            modes = ["per_atom" if v != 0.0 else "per_molecule" for v in mpa.tolist()]
        else:
            modes = [str(m) for m in mode]
            if len(modes) != T or any(m not in NORMALIZATION_MODES for m in modes):
                raise ValueError(f"normalization: mode must list one of {list(NORMALIZATION_MODES)} per target ({T}), got {modes}")
        dev = self.target_mean.device
        self.target_mean.copy_(mean_t.to(dev))
        self.target_std.copy_(std_t.to(dev))
        self.atomref.copy_(ref.to(dev))
        self.target_mean_per_atom.copy_(mpa.to(dev))
        self.normalization_modes = modes
        self._normalization_ready = True
        self.hparams["normalization"] = {"mean": mean_t.tolist(), "std": std_t.tolist(), "atomref": ref.tolist(),
                                         "mean_per_atom": mpa.tolist(), "mode": list(modes)}

    def set_target_info(self, info: Mapping[str, Any] | Sequence[Any]) -> None:
        """Units and report units per target, from ``{name: {...}}`` or a list of ``TargetInfo``."""
        if not isinstance(info, Mapping):
            info = {i.name: i for i in info}
        out: dict[str, dict[str, Any]] = {}
        for name in self.targets:
            if name not in info:
                raise ValueError(f"target_info: no entry for target {name!r} (have {sorted(info)})")
            i = info[name]
            get = (lambda k, d=None: i.get(k, d)) if isinstance(i, Mapping) else (lambda k, d=None: getattr(i, k, d))
            out[name] = {
                "unit": str(get("unit", "")),
                "report_unit": str(get("report_unit", get("unit", ""))),
                "report_scale": float(get("report_scale", 1.0)),
                "description": str(get("description", "")),
                "extensive": bool(get("extensive", False)),
            }
            if get("minimum") is not None:
                out[name]["minimum"] = float(get("minimum"))
        self.target_info = out
        self.hparams["target_info"] = out

    def setup(self, stage: str) -> None:
        """Take normalisation statistics, atomrefs and units from the trainer's datamodule when not given."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            names = list(getattr(dm, "target_names", self.targets))
            if names != self.targets:
                raise ValueError(f"PropertyTask targets {self.targets} differ from the datamodule's {names}; "
                                 "set the same targets for model and data")
        prec = str(getattr(self.trainer, "precision", "")) if self._trainer is not None else ""
        if prec in ("16-true", "bf16-true"):
            raise ValueError(f"precision {prec!r} casts the normalisation statistics to half precision; use '16-mixed' or 'bf16-mixed'")
        if not self.target_info and dm is not None and hasattr(dm, "target_infos"):
            self.set_target_info(list(dm.target_infos))
        if self._normalization_ready:
            return
        if dm is None or not hasattr(dm, "train_statistics"):
            raise ValueError("PropertyTask: no normalisation statistics: pass normalization={'mean','std','atomref'} "
                             "or use a datamodule with train_statistics() and atomrefs()")
        modes = self.resolve_modes()
        atomref = dm.atomrefs() if hasattr(dm, "atomrefs") else None
        if all(m == "per_molecule" for m in modes):
            stats = dm.train_statistics()
            self.set_normalization(_stat(stats, "mean"), _stat(stats, "std"), atomref, mode=modes)
            return
        per_atom = [m == "per_atom" for m in modes]
        if "per_atom" in inspect.signature(dm.train_statistics).parameters:
            stats = dm.train_statistics(per_atom=per_atom)
        else:  # a datamodule whose statistics know no per-atom mode: compute from its training split
            stats = self._statistics_from_split(dm, atomref, per_atom)
        if not isinstance(stats, Mapping) or "mean_per_atom" not in stats:
            raise ValueError(f"{type(dm).__name__}.train_statistics(per_atom=...) returned no 'mean_per_atom'")
        self.set_normalization(stats["mean"], stats["std"], atomref, mean_per_atom=stats["mean_per_atom"], mode=modes)

    def _statistics_from_split(self, dm: Any, atomref: Tensor | None, per_atom: list[bool]) -> dict[str, Any]:
        """:func:`target_statistics` over ``dm.split_dataset("train")``, item by item (after atomrefs)."""
        if not hasattr(dm, "split_dataset"):
            raise ValueError(f"PropertyTask: per-atom normalisation needs {type(dm).__name__}.train_statistics(per_atom=...) "
                             "or a split_dataset('train'); pass normalization= instead")
        if hasattr(dm, "setup"):
            dm.setup("fit")
        ref = None if atomref is None else torch.as_tensor(atomref, dtype=torch.float64)
        ys, ns = [], []
        for item in dm.split_dataset("train"):
            y = item.y.to(torch.float64).reshape(-1)
            if ref is not None:
                y = y - ref[:, item.z].sum(1)
            ys.append(y)
            ns.append(int(item.z.numel()))
        return target_statistics(torch.stack(ys), torch.tensor(ns), per_atom)

    # ------------------------------------------------------------------ normalisation API

    def atomref_sum(self, batch: Any) -> Tensor:
        """[B, T] float64 sum over each graph's atoms of ``atomref[t, z]``."""
        z = batch.z
        index = getattr(batch, "batch", None)
        num_graphs = int(getattr(batch, "num_graphs", 1)) if index is not None else 1
        if index is None:
            index = torch.zeros_like(z)
        per_atom = self.atomref.to(z.device).t()[z]  # [N, T]
        out = torch.zeros(num_graphs, per_atom.shape[1], dtype=torch.float64, device=z.device)
        return out.index_add_(0, index, per_atom)

    def per_atom_offset(self, batch: Any) -> Tensor:
        """[B, T] float64 ``N * mean_per_atom[t]`` of each graph (zero for per-molecule targets)."""
        z = batch.z
        index = getattr(batch, "batch", None)
        if index is None:
            n = torch.full((1,), float(z.numel()), dtype=torch.float64, device=z.device)
        else:
            n = torch.bincount(index, minlength=int(getattr(batch, "num_graphs", 1))).to(torch.float64)
        return n[:, None] * self.target_mean_per_atom.to(z.device)

    def normalize(self, y: Tensor, batch: Any) -> Tensor:
        """Targets [B, T] in target units -> normalised [B, T] float64."""
        return (y.to(torch.float64) - self.atomref_sum(batch) - self.target_mean - self.per_atom_offset(batch)) / self.target_std

    def denormalize(self, out: Tensor, batch: Any) -> Tensor:
        """Network output [B, T] (normalised) -> properties [B, T] float64 in target units.

        ``out * std + mean + N * mean_per_atom + sum_atoms atomref`` (the per-atom term is an
        exact zero for per-molecule targets, so their values are bit for bit those of earlier versions),
        clamped from below where a target declares a physical ``minimum`` (band gaps: 0), as the
        shipped model (:func:`equiformer.hub.denormalize`) does.
        """
        value = out.to(torch.float64) * self.target_std + self.target_mean + self.per_atom_offset(batch) + self.atomref_sum(batch)
        return clamp_to_minimum(value, self._minima())

    def _minima(self) -> list[float | None]:
        """Each target's physical ``minimum`` (from its target info), ``None`` where it has none."""
        return [self.target_info.get(t, {}).get("minimum") for t in self.targets]

    def _clamp_normalized(self, pred: Tensor, batch: Any) -> Tensor:
        """Normalised predictions clamped at the normalised targets' minima (see :meth:`denormalize`)."""
        lo = minimum_row(self._minima(), pred)
        if lo is None:
            return pred
        lo_norm = self.normalize(lo.expand(pred.shape[0], -1).to(torch.float64), batch).to(pred.dtype)
        return torch.maximum(pred, lo_norm)

    # British spelling aliases
    normalise = normalize
    denormalise = denormalize

    def network(self) -> nn.Module:
        """The weights used for evaluation: the EMA copy when kept, else the trained network."""
        return self.ema.module if self.ema is not None else self.model

    def _forward_norm(self, batch: Any, net: nn.Module | None = None) -> Tensor:
        out = (net or self.model)(batch)
        y = out["y"] if isinstance(out, Mapping) else out
        T = len(self.targets)
        if y.dim() == 1 and T == 1:
            y = y[:, None]
        if y.dim() != 2 or y.shape[1] != T:
            raise ValueError(f"model output 'y' has shape {tuple(y.shape)}, expected [B, {T}] for targets {self.targets}")
        return y

    def forward(self, batch: Any) -> Tensor:
        """Normalised predictions [B, T] of the trained (non-averaged) network."""
        return self._forward_norm(batch)

    @torch.no_grad()
    def predict_properties(self, batch: Any) -> Tensor:
        """Properties [B, T] (float64, target units, order ``self.targets``) from the evaluation weights.

        Runs the network in eval mode (no dropout) whatever mode the task is in.
        """
        net = self.network()
        was_training = net.training
        net.eval()
        try:
            return self.denormalize(self._forward_norm(batch, net), batch)
        finally:
            net.train(was_training)

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
        return self.predict_properties(batch)

    # ------------------------------------------------------------------ training

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target = pred.float(), target.float()
        return F.l1_loss(pred, target) if self.hparams.loss == "l1" else F.mse_loss(pred, target)

    def _check_y(self, batch: Any) -> Tensor:
        y = batch.y
        if y.dim() == 1:
            y = y[:, None]
        if y.shape[1] != len(self.targets):
            raise ValueError(f"batch.y has {y.shape[1]} columns but the task has {len(self.targets)} targets {self.targets}")
        return y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        target = self.normalize(self._check_y(batch), batch)
        pred = self._forward_norm(batch)
        loss = self._loss(pred, target)
        B = int(target.shape[0])
        self.log("train/loss", loss, batch_size=B, on_step=True, on_epoch=True, prog_bar=True)
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("train/lr", float(sched.get_last_lr()[0]), batch_size=B, on_step=True, on_epoch=False)
        return loss

    # Exact resume. Lightning restores weights, optimizer, schedule and epoch counter but not the
    # random streams, and it creates a resumed run's first data iterator at another moment than a
    # straight run's. So when the run is seeded (seed_everything), every epoch draws its shuffle
    # order and its dropout masks from seeds that depend only on (seed, epoch): a run resumed at
    # an epoch boundary then continues exactly as the uninterrupted run would have.

    def _epoch_seed(self, stream: int) -> int | None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is None:
            return None
        return (int(seed) * 1_000_003 + 7_919 * (int(self.current_epoch) + 1) + 104_729 * stream) % (2**63 - 1)

    def _seed_train_shuffle(self) -> None:
        """Give an unseeded ``RandomSampler`` of the train loader a generator seeded by (seed, epoch)."""
        seed = self._epoch_seed(stream=1)
        if seed is None:
            return
        loaders = self.trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        for loader in loaders:
            samplers = {id(s): s for s in (getattr(loader, "sampler", None),
                                          getattr(getattr(loader, "batch_sampler", None), "sampler", None))}
            for sampler in samplers.values():
                if isinstance(sampler, RandomSampler) and (sampler.generator is None or getattr(sampler, "_epoch_seeded", False)):
                    sampler.generator = torch.Generator().manual_seed(seed)
                    sampler._epoch_seeded = True  # type: ignore[attr-defined]

    def on_train_epoch_start(self) -> None:
        self._t_last = self._epoch_t0 = time.perf_counter()
        self._epoch_molecules = 0
        self._seed_train_shuffle()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = self._epoch_seed(stream=2) if batch_idx == 0 else None
        if seed is not None:  # dropout etc. of this epoch: from (seed, epoch) on
            torch.manual_seed(seed)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        n = int(getattr(batch, "num_graphs", 1))
        self._epoch_molecules += n
        if self._t_last is not None and now > self._t_last:
            self.log("train/molecules_per_s", n / (now - self._t_last), batch_size=n, on_step=True, on_epoch=False)
        self._t_last = now

    def on_train_epoch_end(self) -> None:
        if self._epoch_t0 is not None and self._epoch_molecules:
            dt = time.perf_counter() - self._epoch_t0
            self.log("train/epoch_molecules_per_s", self._epoch_molecules / max(dt, 1e-9), on_epoch=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: Any, stage: str, metric: PerTargetMAE) -> Tensor:
        target = self.normalize(self._check_y(batch), batch)
        pred = self._forward_norm(batch, self.network())
        loss = self._loss(pred, target)
        # errors of the predictions a user gets: clamped at a target's physical minimum (band gap >= 0)
        metric.update((self._clamp_normalized(pred, batch).to(torch.float64) - target).abs())
        self.log(f"{stage}/loss", loss, batch_size=int(target.shape[0]), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _log_mae(self, stage: str, metric: PerTargetMAE) -> dict[str, float]:
        mae_norm = metric.compute().reshape(-1)  # [T] in units of std (torchmetrics squeezes T=1)
        self.eval_counts[stage] = int(metric.count)
        metric.reset()
        out: dict[str, float] = {}
        for j, name in enumerate(self.targets):
            info = self.target_info.get(name, {})
            scale = float(info.get("report_scale", 1.0))
            unit = info.get("report_unit", info.get("unit", ""))
            value = mae_norm[j] * self.target_std[j].to(mae_norm.device) * scale
            key = f"{stage}/{mae_key(name, unit)}"
            self.log(key, value.float(), prog_bar=(len(self.targets) == 1))
            out[key] = float(value)
        self.log(f"{stage}/mae_norm", mae_norm.mean().float(), prog_bar=len(self.targets) > 1)
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_mae)

    def on_validation_epoch_end(self) -> None:
        self._log_mae("val", self.val_mae)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_mae)

    def on_test_epoch_end(self) -> None:
        self._log_mae("test", self.test_mae)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        return adamw_warmup_cosine(self, warmup_start_lr=self.hparams.warmup_start_lr, min_lr=self.hparams.min_lr)

    # ------------------------------------------------------------------ export

    @staticmethod
    def export_metadata(hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Fields of a shipped model's JSON (:mod:`equiformer.hub`) from a checkpoint's ``hyper_parameters``.

        Returns ``{"model": {"name", "config"}, "targets": [{"name", "unit", "report_unit",
        "report_scale", "description" (, "minimum")}], "normalization": {"mean", "std", "mean_per_atom",
        "mode"}, "atomref": {target: {Z: value}}}`` (zero atomref entries left out;
        ``mean_per_atom``/``mode`` only when the checkpoint records them, so the JSON of a
        checkpoint from before per-atom normalisation is unchanged).
        """
        targets = list(hparams["targets"])
        info = hparams.get("target_info") or {}
        norm = hparams.get("normalization")
        if norm is None:
            raise ValueError("checkpoint hyper_parameters hold no normalization; was the task set up before saving?")
        tlist = []
        for t in targets:
            i = dict(info.get(t, {}))
            tlist.append({"name": t, "unit": i.get("unit", ""), "report_unit": i.get("report_unit", i.get("unit", "")),
                          "report_scale": float(i.get("report_scale", 1.0)), "description": i.get("description", "")})
            if i.get("minimum") is not None:  # predictions are clamped to it (band gaps >= 0)
                tlist[-1]["minimum"] = float(i["minimum"])
        atomref: dict[str, dict[str, float]] = {}
        for t, row in zip(targets, norm.get("atomref") or []):
            nz = {str(z): float(v) for z, v in enumerate(row) if float(v) != 0.0}
            if nz:
                atomref[t] = nz
        normalization: dict[str, Any] = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}
        if norm.get("mean_per_atom") is not None:
            normalization["mean_per_atom"] = [float(v) for v in norm["mean_per_atom"]]
            normalization["mode"] = [str(m) for m in (norm.get("mode") or
                                                      ["per_atom" if float(v) != 0.0 else "per_molecule" for v in norm["mean_per_atom"]])]
        return {
            "model": {"name": hparams["model"], "config": dict(hparams.get("model_kwargs") or {})},
            "targets": tlist,
            "normalization": normalization,
            "atomref": atomref,
        }
