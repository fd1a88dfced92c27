"""n-body benchmark: the simulator's physics, the generator, the models' symmetries, training, scripts."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from equiformer.datasets.nbody import (
    NBodyConfig,
    NBodyDataset,
    NBodySplit,
    generate_split,
    gravity_accelerations,
    leapfrog,
    load_or_generate,
    main as nbody_main,
    sample_initial_states,
    simulate,
    total_energy,
)
from equiformer.models.baselines import NBodyEGNN, NBodyTransformer, full_edge_index
from equiformer.models.gatr_nbody import GATrNBody
from equiformer.testing import assert_equivariant

REPO = Path(__file__).resolve().parents[1]
CFG = NBodyConfig()


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def systems() -> dict[str, torch.Tensor]:
    """48 accepted training systems (float64), generated once."""
    return generate_split("train", 48, CFG, seed=3, dtype=torch.float64)


def _batch(d: dict[str, torch.Tensor], idx) -> Data:
    return NBodyDataset(NBodySplit.from_dict(d))[idx]


# ------------------------------------------------------------------------------------ physics


def test_accelerations_are_minus_gradient_of_potential_over_mass():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mass = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.1
    zero_v = torch.zeros(3, 5, 3, dtype=torch.float64)
    for eps in (0.0, 0.05):
        potential = total_energy(pos, zero_v, mass, G=1.7, softening=eps).sum()
        (grad,) = torch.autograd.grad(potential, pos)
        acc = gravity_accelerations(pos.detach(), mass, G=1.7, softening=eps)
        torch.testing.assert_close(acc, -grad / mass.unsqueeze(-1), rtol=1e-12, atol=1e-12)


def test_leapfrog_closes_a_kepler_orbit_and_conserves_momentum():
    # two bodies on a circular orbit: separation r, period 2 pi sqrt(r^3 / (G (m1 + m2)))
    m1, m2, r, G = 3.0, 0.5, 0.7, 1.0
    mass = torch.tensor([[m1, m2]], dtype=torch.float64)
    omega = math.sqrt(G * (m1 + m2) / r**3)
    x1, x2 = -m2 / (m1 + m2) * r, m1 / (m1 + m2) * r
    pos = torch.tensor([[[x1, 0.0, 0.0], [x2, 0.0, 0.0]]], dtype=torch.float64)
    vel = torch.tensor([[[0.0, omega * x1, 0.0], [0.0, omega * x2, 0.0]]], dtype=torch.float64)
    drift = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)  # a moving centre of mass
    vel = vel + drift
    period = 2 * math.pi / omega
    expected = pos + drift * period
    errors = []
    for steps in (1000, 2000):
        p1, v1, traj, energies = leapfrog(pos, vel, mass, period / steps, steps, G=G, record_every=100)
        errors.append(float((p1 - expected).abs().max()))
    assert errors[1] < 2e-5 * r  # back where it started after one period
    assert 3.8 < errors[0] / errors[1] < 4.2  # second-order convergence
    momentum = (mass.unsqueeze(-1) * v1).sum(1)
    torch.testing.assert_close(momentum, (mass.unsqueeze(-1) * vel).sum(1), rtol=0, atol=1e-12)
    radius = (traj[0, :, 1] - traj[0, :, 0]).norm(dim=-1)
    assert (radius - r).abs().max() < 1e-5
    assert ((energies - energies[:, :1]).abs() / energies[:, :1].abs()).max() < 1e-6


def test_default_step_conserves_energy_and_matches_a_tiny_step(systems):
    # every accepted system: relative energy drift < 1e-4 at *every* step of the default integration
    m, p, v = systems["mass"], systems["pos"], systems["vel"]
    p1, _, _, energies = leapfrog(p, v, m, CFG.dt, CFG.num_steps, CFG.G, CFG.softening, record_every=1)
    assert energies.shape == (len(m), CFG.num_steps + 1)
    drift = ((energies - energies[:, :1]).abs() / energies[:, :1].abs()).amax(1)
    assert drift.max() < 1e-4
    assert drift.median() < 1e-7
    torch.testing.assert_close(p1, systems["pos_final"], rtol=0, atol=1e-9)
    # the stored final positions agree with a 4x finer step (whose own error is 16x smaller)
    fine = replace(CFG, num_steps=4 * CFG.num_steps)
    sub = slice(0, 16)
    p_ref, _, _ = simulate(m[sub], p[sub], v[sub], fine)
    err = (p_ref - systems["pos_final"][sub]).norm(dim=-1)
    assert err.max() < 1e-4 and err.median() < 1e-7
    disp = (systems["pos_final"] - p).norm(dim=-1)
    assert disp.max() > 100 * err.max()  # the target is far from trivial at that accuracy


def test_raw_systems_mostly_conserve_energy_with_the_default_step():
    # before the energy filter: at least 97 % of sampled systems already drift < 1e-4
    g = torch.Generator().manual_seed(11)
    m, p, v = sample_initial_states(256, CFG.num_planets, CFG, g)
    _, _, drift = simulate(m, p, v, CFG)
    assert (drift < 1e-4).double().mean() >= 0.97


# ----------------------------------------------------------------------------------- generator


def test_generator_matches_the_described_distribution(systems):
    m, p, v = systems["mass"], systems["pos"], systems["vel"]
    assert m.shape == (48, 4) and p.shape == v.shape == systems["pos_final"].shape == (48, 4, 3)
    star = m.argmax(1)
    assert ((m.max(1).values >= 1.0) & (m.max(1).values <= 10.0)).all()
    planets = m.sort(1).values[:, :-1]
    assert ((planets >= 0.01) & (planets <= 0.1)).all()
    assert len(set(star.tolist())) > 1  # bodies are permuted
    idx = torch.arange(48)
    assert v[idx, star].norm(dim=-1).max() == 0  # the star starts at rest
    rel = p - p[idx, star].unsqueeze(1)
    r = rel.norm(dim=-1)
    r_planets = r.sort(1).values[:, 1:]
    assert ((r_planets >= 0.1 - 1e-12) & (r_planets <= 1.0 + 1e-12)).all()
    # planets start in one plane through the star, which is randomly oriented
    normals = []
    for s in range(48):
        q = rel[s][r[s] > 0]
        u, sv, vh = torch.linalg.svd(q)
        assert sv[-1] < 1e-9 * sv[0]
        normals.append(vh[-1])
    assert torch.stack(normals).abs().mean(0).max() < 0.9
    assert ((systems["pos_final"] - p).norm(dim=-1).max(1).values <= CFG.outlier_threshold).all()


def test_generalisation_splits_and_reproducibility():
    small = replace(CFG, num_steps=50)
    a = generate_split("test", 12, small, seed=5)
    b = generate_split("test", 5, small, seed=5)
    for k in a:
        assert torch.equal(a[k][:5], b[k])  # prefix property: sample k does not depend on the count
    val = generate_split("val", 5, small, seed=5)
    assert not torch.equal(val["mass"], b["mass"])  # independent streams per split
    objects = generate_split("objects", 6, small, seed=5)
    assert objects["mass"].shape == (6, 6)
    shifted = generate_split("shifted", 64, small, seed=5, dtype=torch.float64)
    in_dist = generate_split("test", 64, small, seed=5, dtype=torch.float64)
    assert abs(float(in_dist["pos"][..., 0].mean())) < 10
    assert abs(float(shifted["pos"][..., 0].mean()) - 200.0) < 10
    with pytest.raises(ValueError, match="unknown n-body split"):
        generate_split("training", 3, small)


def test_cache_and_command_line(tmp_path, capsys):
    small = replace(CFG, num_steps=40)
    d1 = load_or_generate("val", 6, small, seed=1, root=tmp_path)
    files = list(tmp_path.glob("val_*.safetensors"))
    assert len(files) == 1
    d2 = load_or_generate("val", 6, small, seed=1, root=tmp_path)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    d3 = load_or_generate("val", 4, small, seed=1, root=tmp_path)  # a prefix of the cached larger set
    assert all(torch.equal(d1[k][:4], d3[k]) for k in d1)
    assert list(tmp_path.glob("val_*.safetensors")) == files  # served from the larger file, nothing rewritten
    d4 = load_or_generate("val", 4, small, seed=2, root=tmp_path)  # another seed: not served by it
    assert not torch.equal(d4["mass"], d3["mass"])
    out = tmp_path / "cli"
    rc = nbody_main(["--out", str(out), "--num-train", "5", "--num-eval", "3", "--num-steps", "40",
                     "--splits", "train", "objects"])
    assert rc == 0
    assert sorted(f.name.split("_")[0] for f in out.glob("*.safetensors")) == ["objects", "train"]
    assert nbody_main(["--out", str(out), "--num-steps", "0"]) == 2
    assert "num_steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- models


def _randomise_output_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Undo the 'no motion' initialisation so that equivariance tests see a non-trivial map."""
    torch.manual_seed(0)
    if isinstance(model, GATrNBody):
        model.net.linear_out.reset_parameters()
        with torch.no_grad():
            model.net.linear_out.bias_mv.normal_()
    if isinstance(model, NBodyEGNN):
        for layer in model.net.layers:
            for lin in (layer.phi_x[-1], layer.phi_v[-1]):
                torch.nn.init.normal_(lin.weight, std=0.05)
    return model


def test_gatr_is_se3_equivariant_and_e3_when_symmetrised(systems):
    data = _batch(systems, [0, 1, 2])
    spec = dict(irreps={"displacement": "1o"}, input_irreps={"vel": "1o"}, per_atom=["displacement"],
                dtype=torch.float64, n_trials=1)
    # two blocks: with one, the net happens to be odd in the point orientation and thus E(3) already
    gatr = _randomise_output_layers(GATrNBody(hidden_mv_channels=4, hidden_s_channels=8, num_blocks=2, num_heads=2))
    errs = assert_equivariant(gatr, data, parity="SE(3)", **spec)
    assert max(errs.values()) < 1e-9
    with torch.no_grad():
        assert float(gatr.double()(data)["displacement"].abs().max()) > 1e-2  # a non-trivial prediction
    # oriented points: the plain model is not reflection-equivariant, the symmetrised one is
    with pytest.raises(AssertionError, match="reflection"):
        assert_equivariant(gatr, data, parity="E(3)", **spec)
    sym = _randomise_output_layers(GATrNBody(hidden_mv_channels=4, hidden_s_channels=8, num_blocks=2, num_heads=2,
                                             symmetrize_orientation=True))
    assert_equivariant(sym, data, parity="E(3)", **spec)


def test_gatr_exact_under_the_generalisation_shift(systems):
    gatr = _randomise_output_layers(GATrNBody(hidden_mv_channels=4, hidden_s_channels=8, num_blocks=2, num_heads=2)).double()
    data = _batch(systems, [3, 4])
    moved = copy.copy(data)
    shift = torch.tensor([200.0, 0.0, 0.0], dtype=torch.float64)
    moved.pos = data.pos + shift
    with torch.no_grad():
        torch.testing.assert_close(gatr(moved)["pos"], gatr(data)["pos"] + shift, rtol=0, atol=1e-9)


def test_egnn_is_e3_equivariant_and_transformer_is_not(systems):
    data = _batch(systems, [0, 1, 2])
    spec = dict(irreps={"displacement": "1o"}, input_irreps={"vel": "1o"}, per_atom=["displacement"], dtype=torch.float64)
    egnn = _randomise_output_layers(NBodyEGNN(hidden=16, num_layers=2))
    assert_equivariant(egnn, data, parity="E(3)", **spec)
    with torch.no_grad():
        assert float(egnn.double()(data)["displacement"].abs().max()) > 1e-3
    transformer = NBodyTransformer(dim=16, num_blocks=1, num_heads=2)
    with pytest.raises(AssertionError, match="rotation"):
        assert_equivariant(transformer, data, parity="SE(3)", **spec)


@pytest.mark.parametrize("make", [
    lambda: _randomise_output_layers(GATrNBody(hidden_mv_channels=4, hidden_s_channels=8, num_blocks=1, num_heads=2)),
    lambda: NBodyTransformer(dim=16, num_blocks=1, num_heads=2),
    lambda: _randomise_output_layers(NBodyEGNN(hidden=16, num_layers=2)),
], ids=["gatr", "transformer", "egnn"])
def test_models_handle_systems_of_different_sizes_in_one_batch(make):
    torch.manual_seed(0)
    model = make().double().eval()
    small = generate_split("test", 2, replace(CFG, num_steps=20), seed=0, dtype=torch.float64)
    big = generate_split("objects", 1, replace(CFG, num_steps=20), seed=0, dtype=torch.float64)
    parts = [(small, 0), (big, 0), (small, 1)]
    singles = [model(_batch(d, [i]))["pos"] for d, i in parts]
    mixed = Data(
        mass=torch.cat([d["mass"][i].unsqueeze(-1) for d, i in parts]),
        pos=torch.cat([d["pos"][i] for d, i in parts]),
        vel=torch.cat([d["vel"][i] for d, i in parts]),
        batch=torch.tensor([0] * 4 + [1] * 6 + [2] * 4),
    )
    with torch.no_grad():
        torch.testing.assert_close(model(mixed)["pos"], torch.cat(singles), rtol=1e-10, atol=1e-10)


def test_full_edge_index():
    batch = torch.tensor([0, 0, 0, 1, 2, 2])
    ei = full_edge_index(batch)
    pairs = set(map(tuple, ei.t().tolist()))
    expected = {(j, i) for i in range(6) for j in range(6) if i != j and batch[i] == batch[j]}
    assert pairs == expected and ei.shape[1] == len(expected)


# --------------------------------------------------------------------------- training and scripts


def test_task_learns_and_evaluates_all_sets(tmp_path):
    import lightning as L

    from equiformer.tasks.nbody import NBodyDataModule, NBodyTask

    torch.manual_seed(0)
    dm = NBodyDataModule(root=str(tmp_path), seed=0, train_size=128, val_size=64, test_size=32, generalization_size=32,
                         batch_size=32, eval_batch_size=64, num_steps=200)
    task = NBodyTask(model="gatr", model_kwargs={"hidden_mv_channels": 4, "hidden_s_channels": 16, "num_blocks": 1,
                                                 "num_heads": 2}, lr=3e-3)
    trainer = L.Trainer(max_steps=60, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        gradient_clip_val=10.0, num_sanity_val_steps=0, inference_mode=False)
    dm.prepare_data()
    dm.setup("fit")
    val = dm.split("val")
    no_motion = float(((val.pos_final - val.pos) ** 2).mean())
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/mse"]
    assert before == pytest.approx(no_motion, rel=1e-4)  # 'no motion' at initialisation
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/mse"]
    assert after < 0.6 * before
    res = trainer.test(task, datamodule=dm, verbose=False)
    keys = set().union(*res)
    assert {"test/mse", "objects/mse", "shifted/mse"} <= keys
    assert task.hparams.model_kwargs["num_blocks"] == 1  # the model's full config is recorded


def test_task_rejects_unknown_model():
    from equiformer.tasks.nbody import NBodyTask

    with pytest.raises(ValueError, match="unknown model"):
        NBodyTask(model="no_such_model")


def test_configs_build_their_models():
    import yaml

    from equiformer.tasks.nbody import NBodyDataModule, NBodyTask

    for name in ("gatr", "transformer", "egnn"):
        cfg = yaml.safe_load((REPO / "configs" / "nbody" / f"{name}.yaml").read_text())
        task = NBodyTask(**cfg["model"])
        NBodyDataModule(**cfg["data"])
        assert cfg["trainer"]["max_steps"] == 5000 and cfg["data"]["train_size"] == 1000
        assert task.hparams.model == name


def test_speed_benchmark_runs_on_cpu(tmp_path):
    bench = _load_script(REPO / "benchmarks" / "bench_gatr.py", "bench_gatr")
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--tokens", "16", "--mv-channels", "2", "--s-channels", "4", "--blocks", "1",
                     "--heads", "2", "--repeats", "1", "--warmup", "1", "--precisions", "fp32", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"gatr", "transformer"} and all("ms" in r for r in rows.values())
    assert rows["gatr"]["ratio_vs_transformer"] == pytest.approx(rows["gatr"]["ms"] / rows["transformer"]["ms"])
    assert "| gatr | 16 | fp32 | eager |" in res["table"]


def test_speed_benchmark_cuda_graph_mode_needs_cuda(tmp_path):
    """--cuda-graphs on a CPU records the failure in its rows and keeps the eager rows."""
    bench = _load_script(REPO / "benchmarks" / "bench_gatr.py", "bench_gatr")
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--tokens", "16", "--mv-channels", "2", "--s-channels", "4", "--blocks", "1",
                     "--heads", "2", "--repeats", "1", "--warmup", "1", "--precisions", "fp32", "--cuda-graphs",
                     "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eager", "eager", "cuda-graph", "cuda-graph"]
    assert all("ms" in r for r in rows[:2])
    assert all("CUDA graphs need --device cuda" in r["error"] for r in rows[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speed_benchmark_cuda_graph_replay_gives_eager_gradients():
    """The captured step computes the same gradients as the eager step (so its timing is of the same work)."""
    bench = _load_script(REPO / "benchmarks" / "bench_gatr.py", "bench_gatr")
    args = bench._parse(["--tokens", "128", "--mv-channels", "4", "--s-channels", "16", "--blocks", "2", "--heads", "2"])
    args.tokens_now = 128
    device = torch.device("cuda")
    for name in ("gatr", "transformer"):
        torch.backends.cuda.matmul.allow_tf32 = False
        model, inputs = bench.build(name, args, device)
        loss = bench._outputs_mean(model(*inputs()))
        loss.backward()
        del loss  # a live autograd graph would keep AccumulateGrad nodes on the default stream into the capture
        eager = [p.grad.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        bench.time_step(model, inputs, device, "fp32", warmup=2, repeats=2, cuda_graph=True)
        for p, g in zip(model.parameters(), eager):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_leaderboard_script_table(tmp_path):
    run = _load_script(REPO / "leaderboards" / "nbody" / "run.py", "nbody_run")
    rows = [{"model": "gatr", "parameters": 10, "steps": 5, "train_size": 8, "train_seconds": 1.0,
             "test_mse": 1e-3, "objects_mse": 2e-3, "shifted_mse": 1e-3}]
    table = run.markdown_table(rows, {"test": 0.01, "objects": 0.02, "shifted": 0.01})
    assert "| gatr | 10 | 5 | 8 | 0.0010 | 0.0020 | 0.0010 | 5.00e-04 |" in table
    assert "no motion" in table
    args = run._parse(["--steps", "7", "--eval-size", "9", "--model-kwargs", '{"num_blocks": 1}'])
    cfg = run._config("gatr", args)
    assert cfg["trainer"]["max_steps"] == 7 and cfg["trainer"]["val_check_interval"] == 7
    assert cfg["data"]["test_size"] == 9 and cfg["model"]["model_kwargs"]["num_blocks"] == 1
    with pytest.raises(FileNotFoundError):
        run._config("mlp", args)


@pytest.mark.gpu
def test_generation_and_models_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    small = replace(CFG, num_steps=200)
    cpu = generate_split("test", 64, small, seed=2, dtype=torch.float64)
    gpu = generate_split("test", 64, small, seed=2, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(gpu["pos_final"], cpu["pos_final"], rtol=0, atol=1e-9)
    data = _batch(cpu, list(range(16))).to("cuda")
    for model in (GATrNBody(num_blocks=2), NBodyTransformer(num_blocks=2), NBodyEGNN()):
        model = model.double().cuda()
        loss = ((model(data)["pos"] - data.pos_final) ** 2).mean()
        loss.backward()
        assert torch.isfinite(loss)


def test_leaderboard_tests_in_full_fp32_and_restores_precision():
    run = _load_script(REPO / "leaderboards" / "nbody" / "run.py", "nbody_run")
    prev = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with run.full_fp32_matmuls():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(prev[0])
        torch.backends.cudnn.allow_tf32 = prev[1]


def test_gatr_translation_equivariance_needs_full_fp32_at_large_offsets():
    """Why run.py tests without TF32: GATr's predictions for a system moved to x = +200 agree with
    the unmoved ones to ~1e-9 (MSE) in float32, but not when matmul inputs are rounded to TF32's
    10-bit mantissa (emulated here), because the embedded points carry the raw coordinates."""
    import torch.nn.functional as F

    from equiformer.models.gatr_nbody import GATrNBody

    torch.manual_seed(0)
    model = GATrNBody(num_blocks=2)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.02)  # the output layer starts at zero ("no motion"): give it weights
    g = torch.Generator().manual_seed(1)
    pos, vel = torch.randn(32, 3, generator=g) * 2, torch.randn(32, 3, generator=g) * 0.3
    mass, batch = torch.rand(32, 1, generator=g), torch.arange(8).repeat_interleave(4)
    linear = F.linear

    def tf32(x):
        i = x.contiguous().view(torch.int32)
        return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

    def displacement(shift: float, emulate_tf32: bool) -> torch.Tensor:
        data = Data(pos=pos + torch.tensor([shift, 0.0, 0.0]), vel=vel, mass=mass, batch=batch)
        if emulate_tf32:
            F.linear = lambda x, w, b=None: linear(tf32(x), tf32(w), b)
        try:
            with torch.no_grad():
                return model(data)["displacement"]
        finally:
            F.linear = linear

    ref = displacement(0.0, False)
    assert ((displacement(200.0, False) - ref) ** 2).mean() < 1e-7
    assert ((displacement(200.0, True) - ref) ** 2).mean() > 1e-6
