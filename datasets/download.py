"""Download and prepare the public OC20 datasets (S2EF and IS2RE/IS2RS) from fairchem's servers.

Never runs in tests (no network there); the conversion step is tested offline on real frames.

Usage::

    python -m equiformer.datasets.download oc20 --task s2ef --split 200k --root data/oc20
    python -m equiformer.datasets.download oc20 --task s2ef --split val_id --root data/oc20
    python -m equiformer.datasets.download oc20 --task is2re --root data/oc20

Layout produced (the paths the ``configs/oc20/*.yaml`` files expect)::

    <root>/s2ef/<split>/train/data.NNNN.lmdb     train splits 200k, 2M, 20M, all, rattled, md
    <root>/s2ef/all/<val split>/data.NNNN.lmdb   val_id, val_ood_ads, val_ood_cat, val_ood_both
    <root>/s2ef/all/test_*/data.NNNN.lmdb        S2EF test LMDBs (shipped as LMDBs)
    <root>/is2re/{10k,100k,all}/train/data.lmdb  IS2RE/IS2RS (shipped as LMDBs)
    <root>/is2re/all/{val,test}_*/data.lmdb

S2EF train/val tarballs hold ``<i>.extxyz.xz`` trajectories with ``<i>.txt.xz`` metadata
(one line per frame: ``random<sid>,frame<fid>,<reference energy in eV>``); they are
converted here into OCP-format LMDBs (pickled ``torch_geometric`` ``Data`` with ``pos``,
``cell``, ``atomic_numbers``, ``natoms``, ``tags``, ``fixed``, ``energy``, ``forces``, ``sid``,
``fid``), subtracting the reference energy (``ref_energy=True``, the S2EF convention: adsorption
energies). URLs, sizes, MD5 checksums and frame counts are those published in fairchem's
OC20 dataset page (OC20 is CC-BY-4.0, Chanussot et al., ACS Catal. 2021).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IS2RE_COUNTS",
    "OC20_IS2RE",
    "OC20_S2EF",
    "S2EF_TRAIN_SPLITS",
    "S2EF_VAL_SPLITS",
    "convert_s2ef_extxyz",
    "download_file",
    "download_oc20",
    "extract_archive",
    "md5sum",
    "to_ocp_data",
]

_BASE = "https://dl.fbaipublicfiles.com/opencatalystproject/data"

#: S2EF split -> (url, md5, number of frames or None)
OC20_S2EF: dict[str, tuple[str, str, int | None]] = {
    "200k": (f"{_BASE}/s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46", 200_000),
    "2M": (f"{_BASE}/s2ef_train_2M.tar", "953474cb93f0b08cdc523399f03f7c36", 2_000_000),
    "20M": (f"{_BASE}/s2ef_train_20M.tar", "863bc983245ffc0285305a1850e19cf7", 20_000_000),
    "all": (f"{_BASE}/s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd", 133_934_018),
    "val_id": (f"{_BASE}/s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410", 999_866),
    "val_ood_ads": (f"{_BASE}/s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053", 999_838),
    "val_ood_cat": (f"{_BASE}/s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db", 999_809),
    "val_ood_both": (f"{_BASE}/s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729", 999_944),
    "test": (f"{_BASE}/s2ef_test_lmdbs.tar.gz", "bcada432482f6e87b24e14b6b744992a", None),
    "rattled": (f"{_BASE}/s2ef_rattled.tar", "40431149b27b64ce1fb40cac4e2e064b", 16_677_031),
    "md": (f"{_BASE}/s2ef_md.tar", "9fed845aaab8fb4bf85e3a8db57796e0", 38_315_405),
}
S2EF_TRAIN_SPLITS = ("200k", "2M", "20M", "all", "rattled", "md")
S2EF_VAL_SPLITS = ("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")

#: IS2RE/IS2RS LMDBs of all splits: (url, md5)
OC20_IS2RE: tuple[str, str] = (f"{_BASE}/is2res_train_val_test_lmdbs.tar.gz", "cfc04dd2f87b4102ab2f607240d25fb1")
#: systems per IS2RE split (data version 2, Feb 2021)
IS2RE_COUNTS: dict[str, int] = {
    "train": 460_328, "val_id": 24_943, "val_ood_ads": 24_961, "val_ood_cat": 24_963, "val_ood_both": 24_987,
    "test_id": 24_948, "test_ood_ads": 24_930, "test_ood_cat": 24_965, "test_ood_both": 24_985,
}


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def md5sum(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5()  # noqa: S324 - checksum published by the data provider, not a security use
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: str | os.PathLike[str], md5: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (atomically, resuming a partial ``.part`` file) and check its MD5.

    An existing ``dest`` with the right checksum is kept. Raises ``ValueError`` on a checksum
    mismatch (the bad file is left as ``dest`` + ``.bad`` for inspection).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req) as resp:  # noqa: S310 - fixed https URLs above
        if have and resp.status != 206:  # server ignored the range: start over
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = _progress(total, have, dest.name) if progress else None
        with open(part, "ab" if have else "wb") as out:
            while block := resp.read(1 << 22):
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
        if bar is not None:
            bar.close()
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(part, bad)
            raise ValueError(f"{url}: MD5 {got} differs from the published {md5}; download kept as {bad}")
    os.replace(part, dest)
    return dest


def _progress(total: int | None, initial: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc)


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract a ``.tar``/``.tar.gz`` into ``dest``, refusing absolute paths, ``..`` and links."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or m.issym() or m.islnk() or m.isdev():
                raise ValueError(f"{archive}: unsafe member {m.name!r}")
            members.append(m)
        tar.extractall(dest, members=members)  # noqa: S202 - members checked above
    return dest


# ---------------------------------------------------------------------------------------------
# S2EF extxyz -> OCP LMDB
# ---------------------------------------------------------------------------------------------


def to_ocp_data(atoms: Any, sid: int | None = None, fid: int | None = None, ref_energy: float = 0.0,
                with_labels: bool = True) -> Any:
    """An ``ase.Atoms`` frame as an OCP-format ``torch_geometric`` ``Data`` (float32, as fairchem writes).

    Fields: ``pos``, ``cell`` [1,3,3], ``atomic_numbers`` (float), ``natoms``, ``tags`` (long),
    ``fixed`` (float, 1 = fixed by ``FixAtoms``), ``energy`` (stored energy minus
    ``ref_energy``) and ``forces`` (stored, fixed atoms included) when ``with_labels``,
    ``sid``, ``fid``.
    """
    from torch_geometric.data import Data

    from equiformer.datasets.trajectories import atoms_arrays

    a = atoms_arrays(atoms, f"frame sid={sid} fid={fid}")
    d = Data(
        pos=torch.tensor(a["pos"], dtype=torch.float32),
        cell=torch.tensor(a["cell"], dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(a["z"], dtype=torch.float32),
        natoms=int(len(a["z"])),
        tags=torch.tensor(a["tags"], dtype=torch.long),
        fixed=torch.tensor(a["fixed"], dtype=torch.float32),
    )
    if with_labels:
        if not np.isfinite(a["energy"]) or not np.isfinite(a["forces"]).all():
            raise ValueError(f"frame sid={sid} fid={fid}: no stored energy/forces")
        d.energy = float(a["energy"]) - float(ref_energy)
        d.forces = torch.tensor(a["forces"], dtype=torch.float32)
    if sid is not None:
        d.sid = int(sid)
    if fid is not None:
        d.fid = int(fid)
    return d


def _open_text(path: Path) -> Any:
    return lzma.open(path, "rt") if path.suffix == ".xz" else open(path)


def _parse_log_line(line: str, where: str) -> tuple[int, int, float | None]:
    parts = line.strip().split(",")
    try:
        sid = int(parts[0].split("random")[-1])
        fid = int(parts[1].split("frame")[-1])
        ref = float(parts[2]) if len(parts) > 2 and parts[2] != "" else None
    except (IndexError, ValueError):
        raise ValueError(f"{where}: expected 'random<sid>,frame<fid>,<reference energy>', got {line.strip()!r}") from None
    return sid, fid, ref


def _s2ef_pairs(src: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for log in sorted(src.glob("*.txt*")):
        stem = log.name.split(".txt")[0]
        xyz = next((p for p in (src / f"{stem}.extxyz.xz", src / f"{stem}.extxyz") if p.is_file()), None)
        if xyz is None:
            raise FileNotFoundError(f"{log}: no matching {stem}.extxyz(.xz)")
        pairs.append((xyz, log))
    if not pairs:
        raise FileNotFoundError(f"{src}: no *.txt(.xz) / *.extxyz(.xz) S2EF files")
    return sorted(pairs, key=lambda p: (len(p[1].name), p[1].name))


def _s2ef_frames(pairs: Sequence[tuple[Path, Path]], ref_energy: bool, with_labels: bool) -> Iterator[Any]:
    from ase.io import iread

    for xyz, log in pairs:
        with _open_text(log) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        with _open_text(xyz) as f:
            k = -1
            for k, atoms in enumerate(iread(f, index=":", format="extxyz")):
                if k >= len(lines):
                    raise ValueError(f"{xyz}: more frames than lines in {log} ({len(lines)})")
                sid, fid, ref = _parse_log_line(lines[k], f"{log} line {k + 1}")
                if ref_energy and with_labels and ref is None:
                    raise ValueError(f"{log} line {k + 1}: no reference energy (pass ref_energy=False)")
                yield to_ocp_data(atoms, sid, fid, ref if (ref_energy and ref is not None) else 0.0, with_labels)
            if k + 1 != len(lines):
                raise ValueError(f"{xyz}: {k + 1} frames but {len(lines)} lines in {log}")


def convert_s2ef_extxyz(src: str | os.PathLike[str], out: str | os.PathLike[str], num_shards: int = 1,
                        ref_energy: bool = True, with_labels: bool = True) -> int:
    """Convert a folder of S2EF ``<i>.extxyz(.xz)`` + ``<i>.txt(.xz)`` into OCP LMDB shards.

    Args:
        src: folder of the extracted tarball's files (``.xz`` compressed or not).
        out: output folder; shards ``data.0000.lmdb`` ... (trajectory files spread round-robin).
        num_shards: number of LMDB files.
        ref_energy: subtract each frame's reference energy (the S2EF adsorption-energy labels).
        with_labels: store energy and forces (False for unlabelled test frames).

    Returns:
        Number of frames written.
    """
    from equiformer.datasets.ocp_lmdb import write_lmdb

    pairs = _s2ef_pairs(Path(src))
    out = Path(out)
    total = 0
    for s in range(max(int(num_shards), 1)):
        mine = pairs[s :: max(int(num_shards), 1)]
        if mine:
            total += write_lmdb(out / f"data.{s:04d}.lmdb", _s2ef_frames(mine, ref_energy, with_labels))
    return total


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------


def download_oc20(task: str, split: str | None = None, root: str | os.PathLike[str] = "data/oc20",
                  num_shards: int = 8, ref_energy: bool = True, keep_downloads: bool = False,
                  progress: bool = True) -> Path:
    """Download, check, extract and (S2EF train/val) convert one OC20 split; returns its LMDB folder.

    Args:
        task: ``"s2ef"`` or ``"is2re"`` (the IS2RE tarball also holds IS2RS).
        split: S2EF split (:data:`OC20_S2EF` keys); ignored for IS2RE (one tarball, all splits).
        root: data folder (layout in the module docstring).
        num_shards: LMDB shards written per converted S2EF split.
        ref_energy: S2EF: subtract the per-frame reference energies (standard S2EF labels).
        keep_downloads: keep the tarball and the extracted raw files.
    """
    root = Path(root)
    downloads = root / "downloads"
    if task == "is2re":
        url, md5 = OC20_IS2RE
        tarball = download_file(url, downloads / Path(url).name, md5, progress)
        raw = extract_archive(tarball, downloads / "is2re_raw")
        found = next(raw.rglob("is2re"), None)
        if found is None:
            raise FileNotFoundError(f"{raw}: no 'is2re' folder in the extracted archive")
        target = root / "is2re"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(found), str(target))
        if not keep_downloads:
            shutil.rmtree(raw, ignore_errors=True)
            tarball.unlink(missing_ok=True)
        return target
    if task != "s2ef":
        raise ValueError(f"unknown OC20 task {task!r}; choose 's2ef' or 'is2re'")
    if split not in OC20_S2EF:
        raise ValueError(f"unknown S2EF split {split!r}; choose one of {list(OC20_S2EF)}")
    url, md5, count = OC20_S2EF[split]
    tarball = download_file(url, downloads / Path(url).name, md5, progress)
    raw = extract_archive(tarball, downloads / f"s2ef_{split}_raw")
    if split == "test":
        target = root / "s2ef" / "all"
        target.mkdir(parents=True, exist_ok=True)
        for d in sorted(raw.rglob("test_*")):
            if d.is_dir():
                shutil.move(str(d), str(target / d.name))
        out = target
    else:
        src = next((p.parent for p in raw.rglob("*.txt*") if p.is_file()), None)
        if src is None:
            raise FileNotFoundError(f"{raw}: no S2EF *.txt(.xz) files in the extracted archive")
        out = root / "s2ef" / (split if split in S2EF_TRAIN_SPLITS else "all") / ("train" if split in S2EF_TRAIN_SPLITS else split)
        n = convert_s2ef_extxyz(src, out, num_shards=num_shards, ref_energy=ref_energy)
        if count is not None and n != count:
            raise ValueError(f"S2EF {split}: converted {n} frames, the published count is {count}")
    if not keep_downloads:
        shutil.rmtree(raw, ignore_errors=True)
        tarball.unlink(missing_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m equiformer.datasets.download",
                                     description="Download and prepare public datasets (OC20 S2EF / IS2RE).")
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("oc20", help="Open Catalyst 2020")
    p.add_argument("--task", choices=["s2ef", "is2re"], required=True)
    p.add_argument("--split", choices=list(OC20_S2EF), default=None, help="S2EF split")
    p.add_argument("--root", default="data/oc20", help="data folder (default data/oc20)")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--no-ref-energy", action="store_true", help="S2EF: keep total energies")
    p.add_argument("--keep", action="store_true", help="keep tarballs and raw files")
    args = parser.parse_args(argv)
    if args.task == "s2ef" and args.split is None:
        parser.error("--task s2ef needs --split")
    out = download_oc20(args.task, args.split, args.root, args.num_shards, not args.no_ref_energy, args.keep)
    print(f"OC20 {args.task} {args.split or ''}: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
