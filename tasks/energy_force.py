"""LightningModule that trains energy + forces (OC20 S2EF, MD17-style molecules, ...).

The network (any :func:`equiformer.models.build_model` model) predicts a *normalised* energy
``e`` per structure and, with a direct force head, normalised forces ``f`` per atom::

    E = s * (e * std + mean) + sum_atoms ref[z]        s = N (energy_target="per_atom") or 1 ("total")
    F = -dE/dpos                                       gradient forces (autograd; create_graph in training)
    F = f * force_std                                  direct forces

``mean``/``std`` are training-split statistics of the energy after subtracting the optional
per-element linear reference ``ref`` (least-squares fit of the total energies on the element
counts, ``fit_references=True``), per atom or total. ``force_std`` is the RMS of the training
force components (``force_normalization="rms"``), the energy std (``"energy_std"``, fairchem's
OC20 convention ``grad_target_std = target_std``) or 1 (``"none"``). All are float64 buffers
saved in checkpoints and, as plain numbers, in the hyper-parameters.

Forces (``gradient_forces=None`` follows the model's ``config.get("direct_forces")``):

- direct (``direct_forces=True``, e.g. EquiformerV2's OC20 setting): the model's ``"forces"``
  output is taken as normalised forces, ``F = f * force_std``;
- gradient (otherwise, or ``gradient_forces=True``): ``F = -dE/dpos``. The task differentiates
  the de-normalised energy itself, or, when the model already returns ``-d(output)/dpos``
  (EquiformerV2 ``direct_forces=False``, Equiformer ``predict_forces=True``), rescales those
  (``F = -s * std * de/dpos``) instead of differentiating twice. Evaluation re-enables autograd
  inside Lightning's inference mode (on a clone of the batch), so validation needs no
  ``Trainer(inference_mode=False)``; the configs set it anyway.

The same task serves OC20 slabs (periodic, ``fixed``/``tags``) and molecules (MD17-style;
no cell, all atoms free); ``force_weight=0`` trains energies only (e.g. IS2RE with
``energy_key="y_relaxed"``).

Loss (normalised units, as EquiformerV2's OC20 training)::

    loss = energy_weight * L_E(e, (E_true/s - ref/s - mean) / std)
         + force_weight  * L_F(F / force_std, F_true / force_std)       over the selected atoms

``L_E``: ``"l1"`` or ``"mse"``; ``L_F``: ``"l2mae"`` (mean over atoms of the error vector's
norm; EquiformerV2), ``"l1"`` or ``"mse"`` (per component). Selected atoms: all, minus
``fixed`` ones when ``train_on_free_atoms`` (OC20), and only tags in ``force_tags`` if given
(e.g. ``[1, 2]``: surface + adsorbate). The same atoms are evaluated.

Logged: ``train/loss``, ``train/energy_loss``, ``train/force_loss``, ``train/lr``; under
``val/`` and ``test/``: ``loss``, ``energy_mae_meV``, ``energy_mae_meV_per_atom``,
``force_mae_meV_per_A``, ``force_l2mae_meV_per_A``, ``force_cos``, ``efwt`` (see
:mod:`equiformer.tasks.energy_force_metrics`) and ``mae_norm`` (weighted mean of the energy
and force MAEs in normalised units; the checkpoint monitor). Evaluation uses the EMA weights
when kept. Optimiser: AdamW (no decay on biases, 1-D weights and ``model.no_weight_decay()``),
linear warm-up + cosine per step (:class:`equiformer.tasks.schedulers.WarmupCosineLR`);
gradient clipping is the Trainer's ``gradient_clip_val``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from equiformer.tasks.ema import EMAWeights
from equiformer.tasks.energy_force_metrics import EnergyForceMetrics
from equiformer.tasks.schedulers import adamw_warmup_cosine

__all__ = ["EnergyForceTask", "NUM_ELEMENTS", "energy_force_statistics", "zero_force_baseline"]

#: rows of the per-element reference table: index = atomic number 0..118
NUM_ELEMENTS = 119
_ENERGY_TARGETS = ("total", "per_atom")
_ENERGY_LOSSES = ("l1", "mse")
_FORCE_LOSSES = ("l2mae", "l1", "mse")
_FORCE_NORMS = ("rms", "energy_std", "none")


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def _labels_by_iteration(dataset: Dataset, items: Sequence[int], energy_key: str) -> dict[str, Tensor]:
    energy, natoms, z, forces, fixed, tags, atom_item = [], [], [], [], [], [], []
    has_forces = True
    for k, i in enumerate(items):
        d = dataset[int(i)]
        n = int(d.z.numel())
        energy.append(float(_energy_of(d, energy_key).reshape(-1)[0]))
        natoms.append(n)
        z.append(d.z.long())
        f = getattr(d, "forces", None)
        if f is None:
            has_forces = False
        else:
            forces.append(f.double())
        fx = getattr(d, "fixed", None)
        fixed.append(fx.bool() if fx is not None else torch.zeros(n, dtype=torch.bool))
        tg = getattr(d, "tags", None)
        tags.append(tg.long() if tg is not None else torch.zeros(n, dtype=torch.long))
        atom_item.append(torch.full((n,), k, dtype=torch.long))
    out = {"energy": torch.tensor(energy, dtype=torch.float64), "natoms": torch.tensor(natoms), "z": torch.cat(z),
           "fixed": torch.cat(fixed), "tags": torch.cat(tags), "atom_item": torch.cat(atom_item)}
    if has_forces and forces:
        out["forces"] = torch.cat(forces)
    return out


def _label_arrays(dataset: Dataset, items: np.ndarray, energy_key: str = "energy") -> dict[str, Tensor]:
    """Float64 labels of ``dataset[items]`` as :meth:`OC20Trajectories.energy_force_arrays` returns them.

    (Nested) ``Subset``\ s of a dataset with ``energy_force_arrays`` are read from its arrays without
    building items; anything else item by item.
    """
    base, base_items = dataset, np.asarray(items)
    while isinstance(base, Subset):  # indices into the innermost dataset
        base, base_items = base.dataset, np.asarray(base.indices)[base_items]
    if hasattr(base, "energy_force_arrays") and energy_key == "energy":
        return base.energy_force_arrays(torch.as_tensor(base_items, dtype=torch.long))
    return _labels_by_iteration(dataset, np.asarray(items).tolist(), energy_key)


def force_atom_mask(
    num_atoms: int,
    fixed: Tensor | None,
    tags: Tensor | None,
    train_on_free_atoms: bool,
    force_tags: Sequence[int] | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[N]`` bool: the atoms whose forces count (free ones when ``train_on_free_atoms``, only
    ``force_tags`` when given); a missing ``fixed`` / ``tags`` selects no restriction."""
    mask = torch.ones(num_atoms, dtype=torch.bool, device=device)
    if train_on_free_atoms and fixed is not None:
        mask &= ~fixed.bool().reshape(-1)
    if force_tags is not None and tags is not None:
        mask &= torch.isin(tags.reshape(-1), torch.as_tensor(list(force_tags), dtype=torch.long, device=mask.device))
    return mask


def energy_force_statistics(
    dataset: Dataset,
    energy_target: str = "total",
    fit_references: bool = False,
    train_on_free_atoms: bool = True,
    force_tags: Sequence[int] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    energy_key: str = "energy",
) -> dict[str, Any]:
    """Normalisation statistics of energies and forces over ``dataset`` (e.g. the training split).

    Args:
        dataset: contract ``Data`` items with ``energy`` (or ``energy_key``) and optionally
            ``forces``, ``fixed``, ``tags``; a ``Subset`` of a dataset with
            ``energy_force_arrays(items)`` (e.g. :class:`~equiformer.datasets.oc20.OC20Trajectories`)
            is read without building items.
        energy_target: ``"total"`` or ``"per_atom"`` (statistics of E or E / N after the references).
        fit_references: least-squares per-element references of the total energy.
        train_on_free_atoms, force_tags: which atoms' forces count (as in the task).
        max_samples: use a random sample of at most this many structures.
        seed: seed of that sample.

    Returns:
        ``{"energy_mean", "energy_std", "force_rms" (None without forces), "atom_refs": [119]
        float64 (zeros unless fitted), "count", "avg_num_atoms"}`` (floats in eV, eV/Å).
    """
    if energy_target not in _ENERGY_TARGETS:
        raise ValueError(f"energy_target must be one of {_ENERGY_TARGETS}, got {energy_target!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("energy_force_statistics: the dataset is empty")
    items = np.arange(n)
    if max_samples is not None and n > int(max_samples):
        items = np.sort(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False))
    arr = _label_arrays(dataset, items, energy_key)
    energy = arr["energy"].double()
    natoms = arr["natoms"].double()
    refs = torch.zeros(NUM_ELEMENTS, dtype=torch.float64)
    if fit_references:
        counts = torch.zeros(len(energy), NUM_ELEMENTS, dtype=torch.float64)
        counts.index_put_((arr["atom_item"], arr["z"]), torch.ones(len(arr["z"]), dtype=torch.float64), accumulate=True)
        present = counts.sum(0) > 0
        sol = torch.linalg.lstsq(counts[:, present], energy[:, None], driver="gelsd").solution[:, 0]
        refs[present] = sol
        energy = energy - counts @ refs
    e = energy / natoms if energy_target == "per_atom" else energy
    mean = float(e.mean())
    std = float(e.std()) if len(e) > 1 else 1.0
    if not math.isfinite(std) or std <= 1e-12:
        std = 1.0
    force_rms = None
    if "forces" in arr:
        f = arr["forces"][force_atom_mask(len(arr["z"]), arr["fixed"], arr["tags"], train_on_free_atoms, force_tags)]
        if f.numel():
            force_rms = float(f.pow(2).mean().sqrt())
    return {"energy_mean": mean, "energy_std": std, "force_rms": force_rms, "atom_refs": refs,
            "count": int(len(e)), "avg_num_atoms": float(natoms.mean())}


def zero_force_baseline(
    dataset: Dataset,
    train_on_free_atoms: bool = True,
    force_tags: Sequence[int] | None = None,
) -> dict[str, float]:
    """Force errors of predicting F = 0 on ``dataset``, over the atoms the task evaluates.

    The reference any force model has to beat: a model that has learned nothing about the forces
    of unseen systems is at (or above) this level. Same atom selection and definitions as
    :class:`~equiformer.tasks.energy_force_metrics.EnergyForceMetrics` (``force_mae_meV_per_A``:
    mean |F| over components; ``force_l2mae_meV_per_A``: mean |F| vector norm).

    Args:
        dataset: items with ``forces`` (and optionally ``fixed``, ``tags``); a ``Subset`` of a dataset
            with ``energy_force_arrays`` (e.g. :class:`~equiformer.datasets.oc20.OC20Trajectories`) is
            read without building items.
        train_on_free_atoms, force_tags: which atoms count (as in :class:`EnergyForceTask`).

    Returns:
        ``{"force_mae_meV_per_A", "force_l2mae_meV_per_A", "force_rms_eV_per_A", "num_atoms"}``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("zero_force_baseline: the dataset is empty")
    arr = _label_arrays(dataset, np.arange(n))
    if "forces" not in arr:
        raise ValueError("zero_force_baseline: the dataset has no forces")
    f = arr["forces"].double()[force_atom_mask(len(arr["z"]), arr["fixed"], arr["tags"], train_on_free_atoms, force_tags)]
    if f.numel() == 0:
        raise ValueError("zero_force_baseline: no atom is selected (all fixed or of other tags)")
    return {"force_mae_meV_per_A": 1000.0 * float(f.abs().mean()), "force_l2mae_meV_per_A": 1000.0 * float(f.norm(dim=-1).mean()),
            "force_rms_eV_per_A": float(f.pow(2).mean().sqrt()), "num_atoms": int(f.shape[0])}


def _energy_of(batch: Any, key: str) -> Tensor:
    if key == "y":
        return batch.y[:, 0] if batch.y.dim() == 2 else batch.y.reshape(-1)
    value = getattr(batch, key, None)
    if value is None:
        raise ValueError(f"batch has no {key!r} field (the energy target); fields: {sorted(batch.keys())}")
    return value.reshape(-1)


def _graph_index(batch: Any) -> tuple[Tensor, int]:
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.zeros(batch.z.shape[0], dtype=torch.long, device=batch.z.device), 1
    num = int(batch.num_graphs) if hasattr(batch, "num_graphs") else int(index.max()) + 1
    return index, num


# ---------------------------------------------------------------------------------------------
# task
# ---------------------------------------------------------------------------------------------


class EnergyForceTask(pl.LightningModule):
    """Energy + force regression (see the module docstring).

    Args:
        model: registry name for :func:`equiformer.models.build_model`.
        model_kwargs: constructor arguments of the network; after construction the
            hyper-parameters hold the network's full ``config``.
        gradient_forces: forces as ``-dE/dpos`` (True), from the model's ``"forces"`` output
            (False), or decided by the model's ``config["direct_forces"]`` (None).
        energy_target: normalise the ``"total"`` energy (OC20 S2EF, MD17) or the energy ``"per_atom"``.
        energy_key: batch field of the energy (``"energy"``; ``"y"`` = first column of ``y``).
        energy_weight, force_weight: loss weights (EquiformerV2 OC20: 2 / 100 (2M), 4 / 100 (All+MD));
            ``force_weight=0`` trains energies only (no forces needed).
        energy_loss: ``"l1"`` or ``"mse"``.
        force_loss: ``"l2mae"``, ``"l1"`` or ``"mse"``.
        train_on_free_atoms: leave atoms marked ``fixed`` out of the force loss and metrics.
        force_tags: only atoms with these tags count (e.g. ``[1, 2]``); None: all tags.
        fit_references: fit per-element linear references of the energy on the training split.
        force_normalization: ``"rms"``, ``"energy_std"`` or ``"none"`` (module docstring).
        normalization: ``{"energy_mean", "energy_std", "force_std", "atom_refs": [119]}`` (eV,
            eV/Å); default: computed from the datamodule's training split in :meth:`setup`.
        stats_max_samples: structures sampled for those statistics (None: all).
        lr: peak AdamW learning rate.
        weight_decay, betas: AdamW.
        warmup_epochs / warmup_steps: linear warm-up length (steps override epochs).
        warmup_start_lr: learning rate at step 0 (default ``0.2 * lr``, EquiformerV2's warm-up factor).
        min_lr: final learning rate of the cosine (default ``0.01 * lr``).
        max_epochs: cosine length in epochs (default: the trainer's run).
        ema_decay: EMA of the weights for evaluation (None: no EMA).
        efwt_energy_threshold, efwt_force_threshold: EFwT thresholds (eV, eV/Å).
    """

    def __init__(
        self,
        model: str = "equiformer",
        model_kwargs: dict[str, Any] | None = None,
        gradient_forces: bool | None = None,
        energy_target: str = "total",
        energy_key: str = "energy",
        energy_weight: float = 1.0,
        force_weight: float = 100.0,
        energy_loss: str = "l1",
        force_loss: str = "l2mae",
        train_on_free_atoms: bool = True,
        force_tags: list[int] | None = None,
        fit_references: bool = False,
        force_normalization: str = "rms",
        normalization: dict[str, Any] | None = None,
        stats_max_samples: int | None = 20_000,
        lr: float = 2e-4,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.1,
        warmup_steps: int | None = None,
        warmup_start_lr: float | None = None,
        min_lr: float | None = None,
        max_epochs: int | None = None,
        ema_decay: float | None = 0.999,
        efwt_energy_threshold: float = 0.02,
        efwt_force_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        if energy_target not in _ENERGY_TARGETS:
            raise ValueError(f"EnergyForceTask: energy_target must be one of {list(_ENERGY_TARGETS)}, got {energy_target!r}")
        if energy_loss not in _ENERGY_LOSSES:
            raise ValueError(f"EnergyForceTask: energy_loss must be one of {list(_ENERGY_LOSSES)}, got {energy_loss!r}")
        if force_loss not in _FORCE_LOSSES:
            raise ValueError(f"EnergyForceTask: force_loss must be one of {list(_FORCE_LOSSES)}, got {force_loss!r}")
        if force_normalization not in _FORCE_NORMS:
            raise ValueError(f"EnergyForceTask: force_normalization must be one of {list(_FORCE_NORMS)}, got {force_normalization!r}")
        if energy_weight < 0 or force_weight < 0 or energy_weight + force_weight <= 0:
            raise ValueError(f"EnergyForceTask: loss weights must be >= 0 and not both 0 (energy_weight={energy_weight}, "
                             f"force_weight={force_weight})")
        if lr <= 0:
            raise ValueError(f"EnergyForceTask: lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.hparams["betas"] = [float(b) for b in betas]

        from equiformer.models import build_model

        self.model = build_model(model, **dict(model_kwargs or {}))
        config = getattr(self.model, "config", None)
        config = dict(config) if isinstance(config, Mapping) else {}
        if config:
            self.hparams["model_kwargs"] = config
        if gradient_forces is None:
            gradient_forces = config.get("direct_forces") is not True
        self.gradient_forces = bool(gradient_forces)
        #: the model already returns -d(energy output)/dpos (EquiformerV2 direct_forces=False,
        #: Equiformer predict_forces=True): the task rescales those instead of differentiating again
        self.model_gradient_forces = self.gradient_forces and (
            (config.get("direct_forces") is False and config.get("regress_forces", True) is not False)
            or config.get("predict_forces") is True
        )
        self.use_forces = float(force_weight) > 0
        self.ema = EMAWeights(self.model, decay=ema_decay) if ema_decay is not None else None

        self.register_buffer("energy_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("energy_std", torch.ones((), dtype=torch.float64))
        self.register_buffer("force_std", torch.ones((), dtype=torch.float64))
        self.register_buffer("atom_refs", torch.zeros(NUM_ELEMENTS, dtype=torch.float64))
        self._normalization_ready = False
        if normalization is not None:
            self.set_normalization(**normalization)

        thresholds = {"energy_threshold": efwt_energy_threshold, "force_threshold": efwt_force_threshold}
        self.val_metrics = EnergyForceMetrics(**thresholds)
        self.test_metrics = EnergyForceMetrics(**thresholds)
        self._norm_abs: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ normalisation

    def set_normalization(self, energy_mean: float, energy_std: float, force_std: float | None = None,
                          atom_refs: Sequence[float] | Tensor | None = None) -> None:
        """Set the statistics (eV / eV per atom, eV/Å; ``atom_refs`` [119] eV per element)."""
        em, es = float(energy_mean), float(energy_std)
        fs = float(force_std) if force_std is not None else 1.0
        if not (math.isfinite(em) and math.isfinite(es) and es > 0 and math.isfinite(fs) and fs > 0):
            raise ValueError(f"normalization: need finite mean and positive stds, got energy_mean={em}, "
                             f"energy_std={es}, force_std={fs}")
        refs = torch.zeros(NUM_ELEMENTS, dtype=torch.float64)
        if atom_refs is not None:
            refs = torch.as_tensor(atom_refs, dtype=torch.float64).reshape(-1).clone()
            if refs.shape != (NUM_ELEMENTS,):
                raise ValueError(f"normalization: atom_refs must have {NUM_ELEMENTS} entries (index = Z), got {refs.numel()}")
        dev = self.energy_mean.device
        self.energy_mean.fill_(em)
        self.energy_std.fill_(es)
        self.force_std.fill_(fs)
        self.atom_refs.copy_(refs.to(dev))
        self._normalization_ready = True
        self.hparams["normalization"] = {"energy_mean": em, "energy_std": es, "force_std": fs,
                                         "atom_refs": refs.tolist()}

    def normalization_from_statistics(self, stats: Mapping[str, Any]) -> None:
        """Apply :func:`energy_force_statistics` output according to ``force_normalization``."""
        mode = self.hparams.force_normalization
        if mode == "rms":
            fs = stats.get("force_rms")
            if fs is None or fs <= 0:
                fs = 1.0 if not self.use_forces else stats["energy_std"]
        elif mode == "energy_std":
            fs = stats["energy_std"]
        else:
            fs = 1.0
        self.set_normalization(stats["energy_mean"], stats["energy_std"], fs, stats.get("atom_refs"))

    def setup(self, stage: str) -> None:
        """Compute normalisation statistics on the datamodule's training split when not given."""
        if self._normalization_ready:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "split_dataset"):
            raise ValueError("EnergyForceTask: no normalisation statistics: pass normalization={'energy_mean', "
                             "'energy_std', 'force_std', 'atom_refs'} or use a datamodule with split_dataset('train')")
        hp = self.hparams
        stats = energy_force_statistics(dm.split_dataset("train"), hp.energy_target, hp.fit_references,
                                        hp.train_on_free_atoms, hp.force_tags, hp.stats_max_samples,
                                        energy_key=hp.energy_key)
        self.normalization_from_statistics(stats)

    # ------------------------------------------------------------------ prediction

    def network(self) -> nn.Module:
        """The evaluation weights: the EMA copy when kept, else the trained network."""
        return self.ema.module if self.ema is not None else self.model

    def _energy_scale_shift(self, batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(scale [B], shift [B] float64, natoms [B], graph index [N]) with E = e * scale + shift."""
        index, B = _graph_index(batch)
        natoms = torch.bincount(index, minlength=B).to(torch.float64)
        refs = torch.zeros(B, dtype=torch.float64, device=index.device)
        refs.index_add_(0, index, self.atom_refs.to(index.device)[batch.z])
        s = natoms if self.hparams.energy_target == "per_atom" else torch.ones_like(natoms)
        return s * self.energy_std, s * self.energy_mean + refs, natoms, index

    def _raw_energy(self, out: Any) -> Tensor:
        if isinstance(out, Mapping):
            e = out.get("energy")
            if e is None:
                y = out.get("y")
                if y is None:
                    raise ValueError(f"model output has neither 'energy' nor 'y' (keys {sorted(out)})")
                e = y[:, 0] if y.dim() == 2 else y
        else:
            e = out[:, 0] if out.dim() == 2 else out
        return e.reshape(-1)

    def predict_batch(self, batch: Any, net: nn.Module | None = None, create_graph: bool = False) -> dict[str, Tensor]:
        """Energies and forces of a batch in eV and eV/Å.

        Returns:
            ``{"energy_norm": [B] (network output), "energy": [B] float64 eV, "forces": [N, 3] eV/Å
            (model dtype; absent when force_weight is 0 and the model gives none), "natoms": [B],
            "index": [N]}``. With ``create_graph`` the forces keep the graph (training).
        """
        net = net or self.model
        scale, shift, natoms, index = self._energy_scale_shift(batch)
        grad = self.gradient_forces and self.use_forces and not self.model_gradient_forces
        if grad:
            batch = copy.copy(batch)  # shallow: the caller's batch keeps its pos
            batch.pos = batch.pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad or torch.is_grad_enabled()):
            out = net(batch)
            e = self._raw_energy(out)
            res: dict[str, Tensor] = {"energy_norm": e, "natoms": natoms, "index": index}
            res["energy"] = e.to(torch.float64) * scale + shift
            if grad:  # F = -dE/dpos = -scale * de/dpos
                (g,) = torch.autograd.grad(e, batch.pos, grad_outputs=scale.to(e.dtype), create_graph=create_graph)
                res["forces"] = -g
            elif self.model_gradient_forces and self.use_forces:
                f = out.get("forces") if isinstance(out, Mapping) else None
                if f is None:
                    raise ValueError("model returned no 'forces' although its config asks for gradient forces")
                res["forces"] = f * scale.to(f.dtype)[index][:, None]
            elif isinstance(out, Mapping) and out.get("forces") is not None:
                res["forces"] = out["forces"] * self.force_std.to(out["forces"].dtype)
            elif self.use_forces:
                raise ValueError("model returned no 'forces'; use gradient_forces=True (forces = -dE/dpos) or a "
                                 "model with a direct force head")
        if not create_graph:
            res = {k: v.detach() for k, v in res.items()}
        return res

    def forward(self, batch: Any) -> dict[str, Tensor]:
        """``{"energy": [B] eV, "forces": [N, 3] eV/Å}`` of the trained (non-averaged) network."""
        res = self.predict_batch(batch, self.model, create_graph=False)
        return {k: res[k] for k in ("energy", "forces") if k in res}

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Tensor]:
        net = self.network()
        was = net.training
        net.eval()
        try:
            batch = self._grad_ready(batch)
            with torch.inference_mode(False):
                res = self.predict_batch(batch, net, create_graph=False)
        finally:
            net.train(was)
        return {k: res[k] for k in ("energy", "forces") if k in res}

    # ------------------------------------------------------------------ losses

    def force_mask(self, batch: Any) -> Tensor:
        """[N] bool: atoms whose forces enter the loss and the metrics."""
        return force_atom_mask(batch.z.shape[0], getattr(batch, "fixed", None), getattr(batch, "tags", None),
                               self.hparams.train_on_free_atoms, self.hparams.force_tags, device=batch.z.device)

    def loss_terms(self, batch: Any, pred: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss", "energy_loss", "force_loss"}`` (normalised units) of predictions ``pred``."""
        hp = self.hparams
        scale, shift, _, _ = self._energy_scale_shift(batch)
        e_true = _energy_of(batch, hp.energy_key).to(torch.float64)
        target = ((e_true - shift) / scale).to(pred["energy_norm"].dtype)
        de = pred["energy_norm"] - target
        e_loss = de.abs().mean() if hp.energy_loss == "l1" else de.pow(2).mean()
        f_loss = torch.zeros((), dtype=e_loss.dtype, device=e_loss.device)
        if self.use_forces:
            f_true = getattr(batch, "forces", None)
            if f_true is None:
                raise ValueError("batch has no 'forces' but force_weight > 0 (set force_weight: 0 to train energies only)")
            mask = self.force_mask(batch)
            if bool(mask.any()):
                inv = (1.0 / self.force_std).to(pred["forces"].dtype)
                df = (pred["forces"][mask] - f_true[mask].to(pred["forces"].dtype)) * inv
                if hp.force_loss == "l2mae":
                    f_loss = df.norm(dim=-1).mean()
                elif hp.force_loss == "l1":
                    f_loss = df.abs().mean()
                else:
                    f_loss = df.pow(2).mean()
        loss = float(hp.energy_weight) * e_loss + float(hp.force_weight) * f_loss
        return {"loss": loss, "energy_loss": e_loss, "force_loss": f_loss}

    # ------------------------------------------------------------------ training

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        pred = self.predict_batch(batch, self.model, create_graph=True)
        terms = self.loss_terms(batch, pred)
        B = int(pred["energy"].shape[0])
        self.log("train/loss", terms["loss"], batch_size=B, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/energy_loss", terms["energy_loss"], batch_size=B, on_step=True, on_epoch=True)
        if self.use_forces:
            self.log("train/force_loss", terms["force_loss"], batch_size=B, on_step=True, on_epoch=True)
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("train/lr", float(sched.get_last_lr()[0]), batch_size=B, on_step=True, on_epoch=False)
        return terms["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    # ------------------------------------------------------------------ evaluation

    def _grad_ready(self, batch: Any) -> Any:
        """A copy of ``batch`` usable by autograd when evaluation runs under inference mode."""
        if self.gradient_forces and self.use_forces and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return batch.clone()
        return batch

    def _eval_step(self, batch: Any, stage: str, metrics: EnergyForceMetrics) -> Tensor:
        batch = self._grad_ready(batch)
        with torch.inference_mode(False):  # autograd forces; no-op outside inference mode
            pred = self.predict_batch(batch, self.network(), create_graph=False)
            terms = {k: v.detach() for k, v in self.loss_terms(batch, pred).items()}
        # metric states live in the caller's mode (inference tensors under Lightning's evaluation)
        e_true = _energy_of(batch, self.hparams.energy_key)
        if self.use_forces:
            metrics.update(pred["energy"], e_true, pred["natoms"], pred["forces"], batch.forces, pred["index"],
                           self.force_mask(batch))
        else:
            metrics.update(pred["energy"], e_true, pred["natoms"])
        B = int(pred["energy"].shape[0])
        self.log(f"{stage}/loss", terms["loss"], batch_size=B, on_step=False, on_epoch=True, sync_dist=True)
        return terms["loss"]

    def _log_metrics(self, stage: str, metrics: EnergyForceMetrics) -> dict[str, float]:
        values = metrics.compute()
        with torch.inference_mode(False):  # normal tensors: usable by later fit() and validate() alike
            metrics.reset()
        out: dict[str, float] = {}
        keys = ["energy_mae_meV", "energy_mae_meV_per_atom", "efwt"]
        if self.use_forces:
            keys += ["force_mae_meV_per_A", "force_l2mae_meV_per_A", "force_cos"]
        for k in keys:
            v = float(values[k])
            out[f"{stage}/{k}"] = v
            self.log(f"{stage}/{k}", v, prog_bar=k in ("energy_mae_meV", "force_mae_meV_per_A"))
        # normalised MAE for checkpoint selection (energy MAE in the units of the energy std)
        e_norm = float(values["energy_mae_meV"]) / 1000.0 / float(self.energy_std)
        if self.hparams.energy_target == "per_atom":
            e_norm = float(values["energy_mae_meV_per_atom"]) / 1000.0 / float(self.energy_std)
        we, wf = float(self.hparams.energy_weight), float(self.hparams.force_weight) if self.use_forces else 0.0
        f_norm = float(values["force_mae_meV_per_A"]) / 1000.0 / float(self.force_std) if self.use_forces else 0.0
        mae_norm = (we * e_norm + wf * f_norm) / (we + wf)
        out[f"{stage}/mae_norm"] = mae_norm
        self.log(f"{stage}/mae_norm", mae_norm)
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        start = hp.warmup_start_lr if hp.warmup_start_lr is not None else 0.2 * hp.lr
        final = hp.min_lr if hp.min_lr is not None else 0.01 * hp.lr
        return adamw_warmup_cosine(self, warmup_start_lr=start, min_lr=final)
