#!/usr/bin/env bash
# One GPU call (< 10 min): EquiformerV2, ours vs fairchem-core 1.10.0, training steps of the paper's
# 31M model (and 153M if time is left) on the same OC20-like batch, plus a short energy+force
# training of a small EquiformerV2 on the 30 real OC20 relaxation trajectories.
# Run from the repository root on the GPU machine, carrying .fcwhl, .whl and .carry_oc20:
#   OUT=$OUT bash benchmarks/gpu_eqv2.sh            # all stages
#   STAGES=train OUT=$OUT bash benchmarks/gpu_eqv2.sh   # only the OC20 training (CPU check: see benchmarks/README.md)
# Carried folders (git-ignored via .git/info/exclude), built on the dev box with:
#   .fcwhl/: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#              -d .fcwhl fairchem-core==1.10.0 lmdb==3.0.0          # ~1 MB
#   .whl/:   see leaderboards/qm9/gpu_equal_budget.sh (ase is the one fairchem needs from it)
#   .carry_oc20/: cp ../shared/data/oc20/oc20_relaxation_trajectories.tar.gz .carry_oc20/   # 13.7 MB
# fairchem's other imports that the model never calls (torch_scatter, matplotlib, huggingface_hub,
# pydantic) are stubbed at run time by benchmarks/peer_fairchem.py.
# Env: STAGES (default "bench31 train bench153"), TRAIN_S (training wall-clock cap, default 200; STAGES=train alone: 380),
#      TRAIN_EPOCHS (default 4; STAGES=train alone: 7: the cosine schedule's length), TRAIN_EXTRA (more CLI overrides),
#      TRAIN_TIMEOUT (hard kill of the whole train stage, default TRAIN_S + 150),
#      SITE (wheel install folder, default /tmp/site), SKIP_INSTALL=1 (dev box: no wheels, no symlinks).
set -u
OUT=${OUT:-results}
STAGES=${STAGES:-"bench31 train bench153"}
if [ "$STAGES" = train ]; then  # the training alone gets most of the call: ~7 epochs of ~50 s on an H100
  TRAIN_S=${TRAIN_S:-380}; TRAIN_EPOCHS=${TRAIN_EPOCHS:-7}
else
  TRAIN_S=${TRAIN_S:-200}; TRAIN_EPOCHS=${TRAIN_EPOCHS:-4}
fi
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .fcwhl/*.whl .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
[ "${SKIP_INSTALL:-0}" = 1 ] || [ -e equiformer/datasets ] || ln -s ../datasets equiformer/datasets
[ "${SKIP_INSTALL:-0}" = 1 ] || [ -e equiformer/tasks ] || ln -s ../tasks equiformer/tasks
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "setup done at ${SECONDS}s"

for stage in $STAGES; do
  case $stage in
  bench31)
    # the paper's 31M S2EF model at its per-GPU batch of 8 (configs/s2ef/all/equiformer_v2/..._31M.yml)
    timeout $((560 - SECONDS)) python3 benchmarks/bench_equiformer_v2.py --impl both --presets 31M --batch 8 \
      --precisions fp32 tf32 bf16 --warmup 3 --repeats 10 \
      --out "$OUT/eqv2_31M.json" --markdown "$OUT/eqv2_31M.md" > "$OUT/bench31.log" 2>&1
    echo "bench31 exit $? at ${SECONDS}s"; cat "$OUT/eqv2_31M.md" 2>/dev/null || tail -5 "$OUT/bench31.log"
    ;;
  bench153)
    # the paper's 153M model at its per-GPU batch of 4; only when enough of the call is left
    if [ $SECONDS -lt 380 ]; then
      timeout $((570 - SECONDS)) python3 benchmarks/bench_equiformer_v2.py --impl both --presets 153M --batch 4 \
        --precisions fp32 tf32 bf16 --warmup 2 --repeats 6 --child-timeout $(((570 - SECONDS) / 2)) \
        --out "$OUT/eqv2_153M.json" --markdown "$OUT/eqv2_153M.md" > "$OUT/bench153.log" 2>&1
      echo "bench153 exit $? at ${SECONDS}s"; cat "$OUT/eqv2_153M.md" 2>/dev/null || tail -5 "$OUT/bench153.log"
    else
      echo "bench153 skipped: ${SECONDS}s used"
    fi
    ;;
  train)
    # small EquiformerV2, energy + direct forces, on the real OC20 trajectories (split by trajectory,
    # configs/oc20/equiformer_v2_small_s2ef_trajectories.yaml), capped at TRAIN_S seconds of fitting:
    # validation before and after, then test.
    mkdir -p /tmp/eqv2_oc20
    # Lightning's max_time is DD:HH:MM:SS with two-digit fields (a bare "00:00:00:200" is refused)
    max_time=$(printf '%02d:%02d:%02d:%02d' $((TRAIN_S / 86400)) $((TRAIN_S / 3600 % 24)) $((TRAIN_S / 60 % 60)) $((TRAIN_S % 60)))
    # shellcheck disable=SC2086
    timeout "${TRAIN_TIMEOUT:-$((TRAIN_S + 150))}" python3 - --config configs/oc20/equiformer_v2_small_s2ef_trajectories.yaml \
      --data.init_args.source .carry_oc20/oc20_relaxation_trajectories.tar.gz --data.init_args.root /tmp/eqv2_oc20/data \
      --data.init_args.num_workers 8 --trainer.default_root_dir /tmp/eqv2_oc20/run --trainer.enable_progress_bar false \
      --trainer.max_epochs "$TRAIN_EPOCHS" --trainer.max_time "$max_time" --model.max_epochs "$TRAIN_EPOCHS" \
      ${TRAIN_EXTRA:-} > "$OUT/train_oc20.log" 2>&1 <<'PY'
import json, os, sys, time
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Subset
from torch_geometric.loader import DataLoader
from equiformer.tasks.energy_force import zero_force_baseline
from equiformer.tasks.energy_force_cli import EnergyForceCLI

out_dir = os.environ.get("OUT", "results")
if not torch.cuda.is_available():  # CPU check runs share a small machine
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "1")))
argv, sys.argv = sys.argv[1:], sys.argv[:1]
cli = EnergyForceCLI(args=argv, run=False)
trainer, task, dm = cli.trainer, cli.model, cli.datamodule
k = "force_mae_meV_per_A"


class History(Callback):
    """Validation metrics after every training epoch (val runs once per epoch during fit)."""

    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end hook has logged the metrics
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.rows.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                              **{n: round(float(m[n]), 3) for n in ("val/" + k, "val/force_cos", "val/energy_mae_meV") if n in m}})


history = History()
trainer.callbacks.append(history)
t0 = time.time()
res = {"argv": argv, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
res["val_start"] = trainer.validate(task, datamodule=dm, verbose=False)[0]
hp = task.hparams
# every 8th training frame, evaluated like val: does the model fit the systems it trains on?
train_eval = Subset(dm.split_dataset("train"), list(range(0, len(dm.split_dataset("train")), 8)))
train_loader = DataLoader(train_eval, batch_size=dm.eval_batch_size or dm.batch_size, shuffle=False)
res["zero_force"] = {s: zero_force_baseline(d, hp.train_on_free_atoms, hp.force_tags)
                     for s, d in (("train_eval", train_eval), ("val", dm.split_dataset("val")), ("test", dm.split_dataset("test")))}
res["normalization"] = {n: float(getattr(task, n)) for n in ("energy_mean", "energy_std", "force_std")}
res["train_eval_start"] = {n.replace("val/", "train_eval/"): v for n, v in trainer.validate(task, dataloaders=train_loader, verbose=False)[0].items()}
t1 = time.time()
trainer.fit(task, datamodule=dm)
res["fit_s"] = round(time.time() - t1, 1)
res["steps"] = trainer.global_step
res["steps_per_epoch"] = trainer.num_training_batches
res["epochs"] = round(trainer.global_step / max(trainer.num_training_batches, 1), 2)  # current_epoch overcounts a stop by max_time
res["threads"] = torch.get_num_threads()
res["val_history"] = history.rows
res["val_end"] = trainer.validate(task, datamodule=dm, verbose=False)[0]
res["train_eval_end"] = {n.replace("val/", "train_eval/"): v for n, v in trainer.validate(task, dataloaders=train_loader, verbose=False)[0].items()}
res["test"] = trainer.test(task, datamodule=dm, verbose=False)[0]
best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
if best:  # the epoch with the lowest val force MAE (the config's checkpoint monitor)
    res["best_ckpt"] = os.path.basename(best)
    res["test_best"] = trainer.test(task, datamodule=dm, ckpt_path=best, verbose=False)[0]
res["total_s"] = round(time.time() - t0, 1)
res["split_frames"] = {s: len(dm.split_dataset(s)) for s in ("train", "val", "test")}
with open(os.path.join(out_dir, "train_oc20.json"), "w") as f:
    json.dump(res, f, indent=1)
z = {s: v[k] for s, v in res["zero_force"].items()}
print(f"OC20 trajectories, small EquiformerV2: {res['steps']} steps / {res['epochs']} epochs in {res['fit_s']} s")
print(f"zero-force MAE (meV/A, free atoms): train_eval {z['train_eval']:.1f}, val {z['val']:.1f}, test {z['test']:.1f}")
print(f"train_eval force MAE (meV/A): start {res['train_eval_start']['train_eval/' + k]:.1f} -> end {res['train_eval_end']['train_eval/' + k]:.1f} "
      f"(cos {res['train_eval_end']['train_eval/force_cos']:.3f})")
print(f"val force MAE (meV/A): start {res['val_start']['val/' + k]:.1f} -> end {res['val_end']['val/' + k]:.1f} (cos {res['val_end']['val/force_cos']:.3f}); "
      "per epoch " + " ".join(f"{r.get('val/' + k, float('nan')):.1f}" for r in history.rows))
print(f"val energy MAE (meV): start {res['val_start']['val/energy_mae_meV']:.0f} -> end {res['val_end']['val/energy_mae_meV']:.0f}")
print(f"test: force MAE {res['test']['test/' + k]:.1f} meV/A, energy MAE {res['test']['test/energy_mae_meV']:.0f} meV, "
      f"force cos {res['test']['test/force_cos']:.3f}")
if "test_best" in res:
    print(f"test (best-val checkpoint {res['best_ckpt']}): force MAE {res['test_best']['test/' + k]:.1f} meV/A, "
          f"force cos {res['test_best']['test/force_cos']:.3f}")
PY
    echo "train exit $? at ${SECONDS}s"; grep -E "^(OC20|zero-force|train_eval|val |test)|Error" "$OUT/train_oc20.log" | tail -10
    ;;
  *) echo "unknown stage $stage" ;;
  esac
done
echo "total ${SECONDS}s"
