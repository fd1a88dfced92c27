"""Gravitational n-body systems (the GATr paper's n-body benchmark), simulated in torch.

Task: from the masses, initial positions and initial velocities of a star and its planets,
predict every body's position a fixed time ``T`` later.

Generator (one system; units with G = 1, following the description of the GATr n-body
experiment, Brehmer et al. 2023, Sec. 5.1 / App. C):

1. star mass ``M ~ LogUniform(1, 10)``; ``num_planets`` planet masses ``m ~ LogUniform(0.01, 0.1)``;
2. the star sits at the origin at rest; each planet is placed in the x-y plane uniformly
   (by area) in the annulus ``0.1 <= r <= 1``;
3. each planet moves on the circular orbit about the star in the x-y plane (softened:
   ``|v| = sqrt(G M r^2 / (r^2 + eps^2)^(3/2))``), clockwise or anticlockwise with probability
   1/2 each, plus Gaussian noise ``N(0, 0.01^2)`` per velocity component;
4. the bodies are randomly permuted, the system is rotated by a Haar-random rotation
   (positions and velocities) and translated by ``N(0, 20^2)`` per axis; the *shifted*
   generalisation set is then moved a further ``+200`` along x;
5. Newtonian gravity with Plummer softening ``eps`` (potential ``-G m_i m_j / sqrt(r^2 + eps^2)``)
   is integrated for ``T = 0.1`` with ``num_steps`` velocity-Verlet (kick-drift-kick leapfrog)
   steps in float64; symplectic and time-reversible, so the energy error stays bounded;
6. systems in which any body moved more than ``outlier_threshold = 2`` are rejected (close
   encounters slingshot bodies), and so are the few (< 1 %) whose relative energy error
   exceeded ``energy_tolerance = 1e-4`` at any 10th step: close planet-planet encounters the
   fixed step does not resolve, whose final positions would be wrong. Candidates are drawn
   in chunks of 128 with their own seeds, so the first ``k`` systems of a split do not
   depend on how many are requested.

Differences from the paper's data: it integrates 100 semi-implicit Euler steps without
softening; we integrate 1,000 velocity-Verlet steps (dt = 1e-4) with ``eps = 0.01``: the
median relative energy drift is ~1e-9 and 99 % of raw systems stay below 3.5e-5 (measured
on 1,024 systems; tests/test_nbody.py checks it, and the final positions against a 4x finer
step). Splits as in the paper's data script: train
100,000 systems (1 star + 3 planets), val / test 5,000 each, and two generalisation sets of
5,000: ``"objects"`` (1 star + 5 planets) and ``"shifted"`` (translated by +200 along x).

Tensors of a split (``S`` systems of ``N`` bodies, float32 by default):
``mass [S, N]``, ``pos [S, N, 3]``, ``vel [S, N, 3]``, ``pos_final [S, N, 3]``.
As PyG batches (:func:`nbody_batch`): ``mass [B*N, 1]``, ``pos``, ``vel``, ``pos_final``
``[B*N, 3]``, ``batch [B*N]``.

Command line::

    python -m equiformer.datasets.nbody --out DIR --num-train 100000 --num-eval 5000 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NBodyConfig",
    "NBodySplit",
    "NBodyDataset",
    "SPLITS",
    "PAPER_SPLIT_SIZES",
    "gravity_accelerations",
    "total_energy",
    "leapfrog",
    "sample_initial_states",
    "simulate",
    "generate_split",
    "load_or_generate",
    "nbody_batch",
    "split_setting",
    "main",
]

#: split names; ``objects`` has ``generalization_planets`` planets, ``shifted`` is moved +``ood_shift`` along x
SPLITS = ("train", "val", "test", "objects", "shifted")
#: sizes of the paper's data script (train 100k, 5k for each evaluation set)
PAPER_SPLIT_SIZES = {"train": 100_000, "val": 5_000, "test": 5_000, "objects": 5_000, "shifted": 5_000}
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
#: bump when the generator changes what it produces (part of the cache key)
GENERATOR_VERSION = 1
_CHUNK = 128  # candidate systems per independently seeded chunk


@dataclass(frozen=True)
class NBodyConfig:
    """Parameters of the generator (module docstring); defaults reproduce the paper's setting."""

    num_planets: int = 3
    generalization_planets: int = 5
    star_mass_range: tuple[float, float] = (1.0, 10.0)
    planet_mass_range: tuple[float, float] = (0.01, 0.1)
    radius_range: tuple[float, float] = (0.1, 1.0)
    vel_std: float = 0.01
    shift_std: float = 20.0
    ood_shift: float = 200.0
    time: float = 0.1
    num_steps: int = 1000
    softening: float = 0.01
    G: float = 1.0
    outlier_threshold: float = 2.0
    energy_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.num_planets < 1 or self.generalization_planets < 1:
            raise ValueError("NBodyConfig: num_planets and generalization_planets must be >= 1")
        if self.num_steps < 1 or self.time <= 0:
            raise ValueError(f"NBodyConfig: need num_steps >= 1 and time > 0, got {self.num_steps}, {self.time}")
        for name in ("star_mass_range", "planet_mass_range", "radius_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"NBodyConfig: {name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.softening < 0:
            raise ValueError(f"NBodyConfig: softening must be >= 0, got {self.softening}")

    @property
    def dt(self) -> float:
        return self.time / self.num_steps

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NBodyConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------- physics


def _pair_vectors(pos: Tensor) -> tuple[Tensor, Tensor]:
    """``r_ij = pos_j - pos_i`` ``[B, N, N, 3]`` and ``|r_ij|^2`` ``[B, N, N]``."""
    r = pos.unsqueeze(-3) - pos.unsqueeze(-2)
    return r, (r * r).sum(-1)


def gravity_accelerations(pos: Tensor, mass: Tensor, G: float = 1.0, softening: float = 0.0) -> Tensor:
    """Softened Newtonian accelerations ``[B, N, 3]`` from ``pos [B, N, 3]``, ``mass [B, N]``.

    ``a_i = G sum_{j != i} m_j r_ij / (|r_ij|^2 + eps^2)^(3/2)`` with ``r_ij = x_j - x_i``.
    Without softening, coincident bodies exert no force on each other (no division by zero).
    """
    r, r2 = _pair_vectors(pos)
    n = pos.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=pos.device)
    d2 = r2 + softening * softening
    inv3 = torch.where(eye | (d2 == 0), torch.zeros_like(d2), d2.clamp_min(1e-300).rsqrt() ** 3)
    w = inv3 * mass.unsqueeze(-2)  # [B, N(i), N(j)]: m_j / d^3
    return G * (w.unsqueeze(-1) * r).sum(-2)


def total_energy(pos: Tensor, vel: Tensor, mass: Tensor, G: float = 1.0, softening: float = 0.0) -> Tensor:
    """Kinetic plus softened potential energy ``[B]`` (the quantity velocity Verlet conserves)."""
    kinetic = 0.5 * (mass * (vel * vel).sum(-1)).sum(-1)
    _, r2 = _pair_vectors(pos)
    n = pos.shape[-2]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=pos.device), diagonal=1)
    d2 = r2 + softening * softening
    inv = torch.where(upper & (d2 > 0), d2.clamp_min(1e-300).rsqrt(), torch.zeros_like(d2))
    mm = mass.unsqueeze(-1) * mass.unsqueeze(-2)
    return kinetic - G * (mm * inv).sum((-1, -2))


def leapfrog(
    pos: Tensor,
    vel: Tensor,
    mass: Tensor,
    dt: float,
    num_steps: int,
    G: float = 1.0,
    softening: float = 0.0,
    record_every: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Velocity-Verlet (kick-drift-kick) integration, vectorised over systems.

    Args:
        pos, vel: ``[B, N, 3]``; mass ``[B, N]``; ``dt`` time step; ``num_steps`` steps.
        record_every: if > 0, also return positions ``[B, K, N, 3]`` and energies ``[B, K]``
            at steps 0, ``record_every``, ... and the last step.

    Returns:
        ``(pos, vel, trajectory or None, energies or None)`` after ``num_steps`` steps.
    """
    acc = gravity_accelerations(pos, mass, G, softening)
    traj, energies = [], []

    def record() -> None:
        traj.append(pos)
        energies.append(total_energy(pos, vel, mass, G, softening))

    if record_every > 0:
        record()
    for step in range(1, num_steps + 1):
        vel = vel + 0.5 * dt * acc
        pos = pos + dt * vel
        acc = gravity_accelerations(pos, mass, G, softening)
        vel = vel + 0.5 * dt * acc
        if record_every > 0 and (step % record_every == 0 or step == num_steps):
            record()
    if record_every > 0:
        return pos, vel, torch.stack(traj, 1), torch.stack(energies, 1)
    return pos, vel, None, None


# ----------------------------------------------------------------------------------- sampling


def _log_uniform(lo: float, hi: float, shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    u = torch.rand(*shape, generator=gen, dtype=dtype)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _haar_rotations(num: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Haar-random proper rotations ``[num, 3, 3]`` (unit quaternions from a 4D Gaussian)."""
    from equiformer.ga.embedding import quaternion_to_matrix

    return quaternion_to_matrix(torch.randn(num, 4, generator=gen, dtype=dtype))


def sample_initial_states(
    num: int,
    num_planets: int,
    cfg: NBodyConfig,
    generator: torch.Generator,
    shifted: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-4 of the generator: ``(mass [num, N], pos [num, N, 3], vel [num, N, 3])``, ``N = num_planets + 1``.

    Random numbers come from ``generator`` (CPU) in a fixed order, so results are reproducible.
    """
    g = generator
    n = num_planets + 1
    star = _log_uniform(*cfg.star_mass_range, (num, 1), g, dtype)
    planets = _log_uniform(*cfg.planet_mass_range, (num, num_planets), g, dtype)
    mass = torch.cat([star, planets], 1)

    r_lo, r_hi = cfg.radius_range  # uniform by area in the annulus
    u = torch.rand(num, num_planets, generator=g, dtype=dtype)
    radius = torch.sqrt(r_lo**2 + u * (r_hi**2 - r_lo**2))
    phi = 2 * math.pi * torch.rand(num, num_planets, generator=g, dtype=dtype)
    zeros = torch.zeros_like(radius)
    p_pos = torch.stack([radius * torch.cos(phi), radius * torch.sin(phi), zeros], -1)

    spin = torch.where(torch.rand(num, num_planets, generator=g, dtype=dtype) < 0.5, -1.0, 1.0).to(dtype)
    eps2 = cfg.softening**2
    speed = torch.sqrt(cfg.G * star * radius**2 / (radius**2 + eps2) ** 1.5)
    tangent = torch.stack([-torch.sin(phi), torch.cos(phi), zeros], -1)  # z x r_hat
    p_vel = (spin * speed).unsqueeze(-1) * tangent
    p_vel = p_vel + cfg.vel_std * torch.randn(num, num_planets, 3, generator=g, dtype=dtype)

    pos = torch.cat([torch.zeros(num, 1, 3, dtype=dtype), p_pos], 1)
    vel = torch.cat([torch.zeros(num, 1, 3, dtype=dtype), p_vel], 1)

    perm = torch.argsort(torch.rand(num, n, generator=g, dtype=dtype), dim=1)
    mass = torch.gather(mass, 1, perm)
    pos = torch.gather(pos, 1, perm.unsqueeze(-1).expand(-1, -1, 3))
    vel = torch.gather(vel, 1, perm.unsqueeze(-1).expand(-1, -1, 3))

    rot = _haar_rotations(num, g, dtype)
    pos = pos @ rot.transpose(-1, -2)
    vel = vel @ rot.transpose(-1, -2)
    pos = pos + cfg.shift_std * torch.randn(num, 1, 3, generator=g, dtype=dtype)
    if shifted:
        pos = pos + torch.tensor([cfg.ood_shift, 0.0, 0.0], dtype=dtype)
    return mass, pos, vel


def simulate(
    mass: Tensor,
    pos: Tensor,
    vel: Tensor,
    cfg: NBodyConfig,
    device: str | torch.device | None = None,
    energy_every: int = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 5: final ``(pos, vel, drift)`` after ``cfg.time``.

    Integrates in float64 on ``device`` and returns on the input's device. ``drift [B]`` is
    the largest relative energy error ``|E(t) - E(0)| / |E(0)|`` seen at every
    ``energy_every``-th step and at the end.
    """
    dev = torch.device(device) if device is not None else pos.device
    out_dev = pos.device
    p, v, m = (t.to(dev, torch.float64) for t in (pos, vel, mass))
    p, v, _, energies = leapfrog(p, v, m, cfg.dt, cfg.num_steps, cfg.G, cfg.softening, record_every=energy_every)
    drift = ((energies - energies[:, :1]).abs() / energies[:, :1].abs().clamp_min(1e-300)).amax(1)
    return p.to(out_dev), v.to(out_dev), drift.to(out_dev)


def _chunk_seed(seed: int, split: str, chunk: int) -> int:
    blob = f"nbody-v{GENERATOR_VERSION}/{seed}/{split}/{chunk}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def split_setting(split: str, cfg: NBodyConfig) -> tuple[int, bool]:
    """(number of planets, shifted?) of a named split."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown n-body split {split!r}; choose from {', '.join(SPLITS)}")
    planets = cfg.generalization_planets if split == "objects" else cfg.num_planets
    return planets, split == "shifted"


def generate_split(
    split: str,
    num: int,
    cfg: NBodyConfig = NBodyConfig(),
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Generate ``num`` accepted systems of ``split`` (one of :data:`SPLITS`).

    Returns ``{"mass" [num, N], "pos" [num, N, 3], "vel" [num, N, 3], "pos_final" [num, N, 3]}``
    in ``dtype`` on the CPU; ``device`` is where the integration runs (e.g. ``"cuda"``).
    Sample ``k`` depends only on ``(seed, split, cfg, k)``, not on ``num``.
    """
    if num < 0:
        raise ValueError(f"number of systems must be >= 0, got {num}")
    planets, shifted = split_setting(split, cfg)
    parts: dict[str, list[Tensor]] = {"mass": [], "pos": [], "vel": [], "pos_final": []}
    have, chunk = 0, 0
    max_chunks = 1000 + 4 * num // _CHUNK
    while have < num:
        # integrate several independently seeded chunks together (one batched integration)
        group = max(1, math.ceil((num - have) * 1.05 / _CHUNK))
        samples = [
            sample_initial_states(_CHUNK, planets, cfg, torch.Generator().manual_seed(_chunk_seed(seed, split, c)),
                                  shifted=shifted)
            for c in range(chunk, chunk + group)
        ]
        m, p0, v0 = (torch.cat(t) for t in zip(*samples))
        p1, _, drift = simulate(m, p0, v0, cfg, device=device)
        keep = (p1 - p0).norm(dim=-1).amax(-1) <= cfg.outlier_threshold
        keep &= torch.isfinite(p1).all(-1).all(-1) & (drift <= cfg.energy_tolerance)
        for k, t in zip(("mass", "pos", "vel", "pos_final"), (m, p0, v0, p1)):
            parts[k].append(t[keep])
        have += int(keep.sum())
        chunk += group
        if chunk > max_chunks:
            raise RuntimeError(f"n-body generator rejects almost every system; check the config {cfg}")
    return {k: torch.cat(v)[:num].to(dtype).contiguous() for k, v in parts.items()}


def _cache_key(split: str, num: int, cfg: NBodyConfig, seed: int, dtype: torch.dtype) -> str:
    from equiformer.datasets.cache import cache_key

    return cache_key(version=GENERATOR_VERSION, split=split, num=num, cfg=cfg.to_dict(), seed=seed, dtype=str(dtype))


def load_or_generate(
    split: str,
    num: int,
    cfg: NBodyConfig = NBodyConfig(),
    seed: int = 0,
    root: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
) -> dict[str, Tensor]:
    """:func:`generate_split`, cached as ``<root>/<split>_<key>.safetensors``.

    ``root`` defaults to ``$EQUIFORMER_CACHE/nbody`` or ``~/.cache/equiformer/nbody``; the key
    hashes the split, size, config, seed, dtype and generator version. A cached *larger* set of
    the same split, config and seed serves its first ``num`` systems (they are the same systems),
    so a folder written by ``python -m equiformer.datasets.nbody --out DIR --num-train 100000``
    serves ``train_size=1000`` with ``root=DIR``.
    """
    from equiformer.datasets.cache import cache_file, default_cache_root, load_tensors, save_tensors

    root = Path(root) if root is not None else default_cache_root("nbody")
    path = cache_file(root, split, _cache_key(split, num, cfg, seed, dtype))
    meta = {"split": split, "num": num, "seed": seed, "config": cfg.to_dict(), "version": GENERATOR_VERSION,
            "dtype": str(dtype)}
    if cache:
        hit = load_tensors(path)
        if hit is not None:
            return hit[0]
        for other in sorted(root.glob(f"{split}_*.safetensors")):  # a larger set of the same stream
            hit = load_tensors(other)
            if hit is None:
                continue
            tensors, m = hit
            if {k: v for k, v in m.items() if k != "num"} == {k: v for k, v in meta.items() if k != "num"} \
                    and int(m.get("num", -1)) >= num:
                return {k: v[:num].contiguous() for k, v in tensors.items()}
    data = generate_split(split, num, cfg, seed, device=device, dtype=dtype)
    if cache:
        save_tensors(path, data, meta)
    return data


# ------------------------------------------------------------------------------ torch datasets


def nbody_batch(mass: Tensor, pos: Tensor, vel: Tensor, pos_final: Tensor | None = None):
    """Dense ``[B, N, ...]`` tensors -> one PyG ``Data`` holding the flat batch.

    Fields: ``mass [B*N, 1]``, ``pos``, ``vel``, ``pos_final`` ``[B*N, 3]``, ``batch [B*N]`` and
    ``num_bodies`` (N). Models read ``data.batch`` (sorted) and ``data.num_graphs``.
    """
    from torch_geometric.data import Data

    b, n = mass.shape
    out = Data(
        mass=mass.reshape(b * n, 1),
        pos=pos.reshape(b * n, 3),
        vel=vel.reshape(b * n, 3),
        batch=torch.arange(b, device=mass.device).repeat_interleave(n),
    )
    if pos_final is not None:
        out.pos_final = pos_final.reshape(b * n, 3)
    out.num_bodies = n
    out.num_graphs = b
    return out


@dataclass
class NBodySplit:
    """The dense tensors of one split (see :func:`generate_split`)."""

    mass: Tensor
    pos: Tensor
    vel: Tensor
    pos_final: Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.mass.shape[0])

    @property
    def num_bodies(self) -> int:
        return int(self.mass.shape[1])

    @classmethod
    def from_dict(cls, d: dict[str, Tensor], name: str = "") -> "NBodySplit":
        missing = [k for k in ("mass", "pos", "vel", "pos_final") if k not in d]
        if missing:
            raise ValueError(f"n-body split {name!r} lacks tensors {missing}")
        return cls(d["mass"], d["pos"], d["vel"], d["pos_final"], name)

    def subset(self, num: int) -> "NBodySplit":
        if num > len(self):
            raise ValueError(f"n-body split {self.name!r} holds {len(self)} systems, {num} requested")
        return NBodySplit(self.mass[:num], self.pos[:num], self.vel[:num], self.pos_final[:num], self.name)


class NBodyDataset(torch.utils.data.Dataset):
    """Map-style dataset over a :class:`NBodySplit`.

    ``ds[i]`` (an int) is one system as a batch of one; ``ds[[i, j, ...]]`` (a list or tensor of
    indices, e.g. from a ``BatchSampler`` with ``DataLoader(batch_size=None)``) is the whole
    batch in one slicing operation (:func:`nbody_batch`), which avoids per-system collation.
    """

    def __init__(self, split: NBodySplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx: int | Sequence[int] | Tensor):
        index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        s = self.split
        return nbody_batch(s.mass[index], s.pos[index], s.vel[index], s.pos_final[index])


# ------------------------------------------------------------------------------------ command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m equiformer.datasets.nbody",
        description="Generate the GATr n-body benchmark (train/val/test + 'objects' and 'shifted' generalisation sets).",
    )
    p.add_argument("--out", required=True, help="output folder (one safetensors file per split)")
    p.add_argument("--num-train", type=int, default=PAPER_SPLIT_SIZES["train"])
    p.add_argument("--num-eval", type=int, default=5000, help="systems in val, test, objects and shifted each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--num-planets", type=int, default=NBodyConfig.num_planets)
    p.add_argument("--generalization-planets", type=int, default=NBodyConfig.generalization_planets)
    p.add_argument("--num-steps", type=int, default=NBodyConfig.num_steps, help="velocity-Verlet steps over --time")
    p.add_argument("--time", type=float, default=NBodyConfig.time)
    p.add_argument("--softening", type=float, default=NBodyConfig.softening)
    p.add_argument("--device", default="cpu", help="where to integrate, e.g. cuda")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = NBodyConfig(
            num_planets=args.num_planets, generalization_planets=args.generalization_planets,
            num_steps=args.num_steps, time=args.time, softening=args.softening,
        )
    except ValueError as e:
        print(f"nbody: error: {e}", file=sys.stderr)
        return 2
    for split in args.splits:
        num = args.num_train if split == "train" else args.num_eval
        t0 = time.perf_counter()
        load_or_generate(split, num, cfg, args.seed, root=args.out, device=args.device)
        print(f"{split:8s} {num:7d} systems  {time.perf_counter() - t0:6.1f} s  -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
