"""CrystalDataModule on real crystals: MP (flla_2015 + the official MEGNet split), JARVIS
(ALIGNN's sample with the leaderboard split), a matbench-format file, perov_5; batches,
splits, normalisation statistics, and PropertyTask training on crystals."""

from __future__ import annotations

import gzip
import json
import logging
import os
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")

from equiformer.tasks.crystal_datamodule import CRYSTAL_DATASETS, CrystalDataModule  # noqa: E402
from equiformer.tasks.datamodule import StructureDataModule  # noqa: E402

DATA = Path(os.environ.get("EQUIFORMER_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
SAMPLE = Path(__file__).resolve().parent / "files" / "jarvis_sample"
GAP_SPLIT = SAMPLE / "leaderboard" / "dft_3d_optb88vdw_bandgap.json.zip"
N = 80
needs_mp = pytest.mark.skipif(not (DATA / "materials_project" / "flla_2015.csv").is_file(),
                              reason=f"shared MP data not found in {DATA}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("crystal_dm"))


@pytest.fixture(scope="module")
def mp(root) -> CrystalDataModule:
    dm = CrystalDataModule("mp_e_form", root=root, data_dir=str(DATA), subset=N, batch_size=16, eval_batch_size=40,
                           progress=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def megnet_ids() -> dict[str, str]:
    with zipfile.ZipFile(DATA / "materials_project" / "megnet_splits" / "megnet_e_form.json.zip") as z:
        raw = json.loads(z.read("megnet_e_form.json"))
    return {i: name for name, part in raw.items() for i in part}


@needs_mp
def test_mp_official_split_and_batches(mp):
    assert isinstance(mp, StructureDataModule) and mp.target_names == ["e_form"] and mp.num_targets == 1
    assert mp.target_infos[0].unit == "eV/atom"
    ids = megnet_ids()
    flla = pd.read_csv(DATA / "materials_project" / "flla_2015.csv", comment="#").head(N)
    want = {s: sorted(m for m in flla.material_id if ids.get(m) == s) for s in ("train", "val", "test")}
    ds = mp.crystals
    got = {s: sorted(ds.ids[int(k)] for k in idx) for s, idx in mp.splits.items()}
    assert got == want and mp.split_sizes() == {s: len(v) for s, v in want.items()}
    seen = []
    for batch in mp.val_dataloader():
        B = batch.num_graphs
        assert batch.y.shape == (B, 1) and batch.cell.shape == (B, 3, 3) and bool(batch.pbc.all())
        assert batch.pbc.shape == (B, 3) and len(batch.material_id) == B and B <= 40
        assert all(ids[m] == "val" for m in batch.material_id)
        seen.append(batch.idx)
    assert torch.equal(torch.cat(seen), mp.splits["val"])  # evaluation keeps the split's order
    first = next(iter(mp.train_dataloader()))
    assert first.num_graphs == 16 and first.z.dtype == torch.long and first.pos.dtype == torch.get_default_dtype()


@needs_mp
def test_mp_statistics_and_atomrefs(mp):
    stats = mp.train_statistics()
    y = mp.crystals.y_table[mp.splits["train"], 0].numpy()
    assert stats["count"] == len(y) == mp.split_sizes()["train"]
    np.testing.assert_allclose(stats["mean"].numpy(), [y.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats["std"].numpy(), [y.std(ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(stats["mad"].numpy(), [np.abs(y - y.mean()).mean()], rtol=1e-12)
    assert stats["mean"].dtype == torch.float64 and -3 < float(stats["mean"]) < 1  # eV/atom
    assert torch.equal(mp.atomrefs(), torch.zeros(1, 119, dtype=torch.float64))
    assert stats["mode"] == ["per_molecule"] and float(stats["mean_per_atom"]) == 0.0
    # per-atom statistics straight from the stored values (PropertyTask's normalize="per_atom")
    n = np.array([len(mp.crystals[int(i)].z) for i in mp.splits["train"]], dtype=np.float64)
    pa = mp.train_statistics(per_atom=[True])
    mpa = (y / n).mean()
    assert pa["mode"] == ["per_atom"] and float(pa["mean"]) == 0.0
    np.testing.assert_allclose(pa["mean_per_atom"].numpy(), [mpa], rtol=1e-12)
    np.testing.assert_allclose(pa["std"].numpy(), [(y - n * mpa).std(ddof=1)], rtol=1e-12)


@needs_mp
def test_mp_random_split(root, mp):
    dm = CrystalDataModule("mp_e_form", root=root, data_dir=str(DATA), subset=N, split="random", train_size=0.6,
                           val_size=20, split_seed=3, progress=False)
    n = len(mp.crystals)
    assert dm.split_sizes() == {"train": int(0.6 * n), "val": 20, "test": n - int(0.6 * n) - 20}
    assert torch.equal(torch.cat(list(dm.splits.values())).sort().values, torch.arange(n))
    assert dm.crystals.ids == mp.crystals.ids  # the same MEGNet structures, split at random
    again = CrystalDataModule("mp_e_form", root=root, data_dir=str(DATA), subset=N, split="random", train_size=0.6,
                              val_size=20, split_seed=3, progress=False)
    assert all(torch.equal(dm.splits[k], again.splits[k]) for k in dm.splits)


@needs_mp
def test_mp_gap_and_elastic_fallback(root, caplog):
    gap = CrystalDataModule("mp_gap", root=root, data_dir=str(DATA), subset=N, progress=False)
    assert gap.target_names == ["gap"] and sum(gap.split_sizes().values()) == len(gap.crystals)
    with caplog.at_level(logging.WARNING, logger="equiformer.tasks"):
        el = CrystalDataModule("mp_elastic", root=root, data_dir=str(DATA), subset=40, progress=False)
        sizes = el.split_sizes()
    assert "no official split available; using a random split" in caplog.text and el.split_used == "random"
    assert el.target_names == ["log_kvrh", "log_gvrh"] and sizes == {"train": 32, "val": 4, "test": 4}
    assert el.train_statistics()["mean"].shape == (2,)


def test_jarvis_leaderboard_and_alignn(root):
    dm = CrystalDataModule("jarvis_dft_3d", root=root, source=str(SAMPLE), targets="optb88vdw_bandgap",
                           split_file=str(GAP_SPLIT), batch_size=8, progress=False)
    assert dm.split_sizes() == {"train": 44, "val": 2, "test": 4} and dm.split_used == "official"
    with zipfile.ZipFile(GAP_SPLIT) as z:
        raw = json.loads(z.read("dft_3d_optb88vdw_bandgap.json"))
    for name, idx in dm.splits.items():
        assert {dm.crystals.ids[int(k)] for k in idx} == set(raw[name])
    al = CrystalDataModule("jarvis_dft_3d", root=root, source=str(SAMPLE), targets="optb88vdw_bandgap",
                           split="alignn", progress=False)
    assert al.split_sizes() == {"train": 40, "val": 5, "test": 5}
    with pytest.raises(ValueError, match="ALIGNN's JARVIS protocol"):
        CrystalDataModule("mp_e_form", split="alignn")


def test_matbench_fold_with_carved_validation(tmp_path, root):
    import ase.io

    names = sorted(SAMPLE.glob("POSCAR-*.vasp"))[:30]
    from pymatgen.io.ase import AseAtomsAdaptor

    dicts = [AseAtomsAdaptor.get_structure(ase.io.read(str(p), format="vasp")).as_dict() for p in names]
    table = {"index": [p.stem for p in names], "columns": ["structure", "exfoliation_en"],
             "data": [[d, float(k)] for k, d in enumerate(dicts)]}
    path = tmp_path / "matbench_jdft2d.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(table, f)
    dm = CrystalDataModule("matbench", root=root, source=str(path), fold=1, val_size=0.25, progress=False)
    assert dm.target_names == ["exfoliation_en"] and dm.target_infos[0].unit == "meV/atom"
    s = dm.splits
    assert [len(s[k]) for k in ("train", "val", "test")] == [18, 6, 6]
    from equiformer.datasets.matbench import matbench_fold_indices

    assert torch.equal(s["test"], matbench_fold_indices(30, 1)["test"])
    assert torch.equal(torch.cat([s["train"], s["val"]]).sort().values, matbench_fold_indices(30, 1)["train"])
    with pytest.raises(ValueError, match="has the one target 'exfoliation_en'"):
        CrystalDataModule("matbench", source=str(path), targets="e_form")


@pytest.mark.skipif(not (DATA / "perovskites" / "perov_5_val.csv.gz").is_file(), reason="no perov_5 data")
def test_perovskites(root):
    import pymatgen.core as pmg

    with pytest.raises(ValueError, match="no train/test part"):
        CrystalDataModule("perovskites", root=root, data_dir=str(DATA), subset=60, progress=False).setup()
    dm = CrystalDataModule("perovskites", root=root, data_dir=str(DATA), subset=60, split="random",
                           targets="heat_all,ind_gap", progress=False)
    assert sum(dm.split_sizes().values()) == 60
    df = pd.read_csv(DATA / "perovskites" / "perov_5_val.csv.gz").head(60)
    ds = dm.crystals
    for i in range(0, 60, 7):
        d = ds[i]
        s = pmg.Structure.from_str(df.cif.iloc[i], fmt="cif")
        assert d.material_id == f"perov5-{df.material_id.iloc[i]}" and d.z.tolist() == [x.specie.Z for x in s]
        np.testing.assert_allclose(d.pos.double().numpy(), s.cart_coords, atol=1e-5)
        np.testing.assert_allclose(d.y[0].double().numpy(), [df.heat_all.iloc[i], df.ind_gap.iloc[i]], rtol=1e-6)
    split = ds.official_split()  # the first 60 rows all come from CDVAE's val file
    assert list(split) == ["val"] and torch.equal(split["val"], torch.arange(60))


def test_property_task_trains_crystals(root, tmp_path):
    """The same PropertyTask trains on crystals: normalisation from train_statistics()."""
    from equiformer.tasks.property import PropertyTask

    torch.manual_seed(0)
    dm = CrystalDataModule("jarvis_dft_3d", root=root, source=str(SAMPLE), targets="optb88vdw_bandgap",
                           split_file=str(GAP_SPLIT), batch_size=8, progress=False)
    task = PropertyTask(model="equiformer_small", model_kwargs={"num_layers": 1}, targets=["optb88vdw_bandgap"],
                        ema_decay=None, warmup_epochs=0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    stats = dm.train_statistics()
    assert torch.allclose(task.target_mean.cpu(), stats["mean"]) and torch.allclose(task.target_std.cpu(), stats["std"])
    assert task.target_info["optb88vdw_bandgap"]["unit"] == "eV"
    out = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert all(np.isfinite(v) for v in out.values()) and task.eval_counts.get("test") == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown crystal dataset 'qm9'"):
        CrystalDataModule("qm9")
    with pytest.raises(ValueError, match="needs source="):
        CrystalDataModule("jarvis_dft_3d")
    with pytest.raises(ValueError, match="split must be one of"):
        CrystalDataModule("mp_e_form", split="megnet")
    with pytest.raises(ValueError, match="unknown materials_project target 'U0'"):
        CrystalDataModule("mp_e_form", targets="U0")
    assert set(CRYSTAL_DATASETS) >= {"mp_e_form", "mp_gap", "jarvis_dft_3d", "matbench", "perovskites"}
