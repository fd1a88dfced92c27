#!/usr/bin/env bash
# One GPU call (< 10 min): the GATr-vs-transformer speed benchmark, then the n-body leaderboard
# (GATr, Transformer, EGNN at equal steps, one after the other, each alone on the GPU), run from
# the repository root on the GPU machine:
#   OUT=$OUT bash leaderboards/nbody/gpu_run.sh
# The GPU image has torch, e3nn, torch-geometric, lightning, safetensors; nothing else is needed
# (no carried files: the n-body data is generated on the GPU in a few seconds).
# Outputs (4 files): $OUT/bench_gatr.json (+ .md), $OUT/nbody.json, $OUT/log.txt.
# Knobs (environment): STAGES ("bench train"; also "compile": the benchmark with torch.compile'd
#   models, bf16, 4k and 16k tokens, into $OUT/bench_gatr_compile.json, and "gputests": pytest -m gpu
#   on the GATr and n-body tests), DEVICE (cuda), STEPS (5000, the paper's budget), TOKENS ("1024 4096 16384"),
#   DEADLINE_S (520: the whole script ends by then), BENCH_TIMEOUT_S (150), EVAL_SIZE (5000),
#   TRAIN_SIZE (1000), PROBE_STEPS (20), BENCH_ARGS (bench_gatr.py arguments, default --cuda-graphs:
#   eager rows and rows that replay each step as one CUDA graph), RUN_ARGS (extra run.py).
# If STEPS steps of all three models do not fit the time left after the benchmark, run.py lowers
# the step count for all three equally (it probes each model first; see its --budget-s) and
# records that under "budget" in nbody.json.
# CPU smoke test of this script (tiny settings, ~3 min on one core):
#   DEVICE=cpu STEPS=20 TOKENS="64" EVAL_SIZE=256 TRAIN_SIZE=128 PROBE_STEPS=2 \
#     BENCH_ARGS="--mv-channels 4 --s-channels 16 --blocks 2 --repeats 1 --warmup 1" OUT=/tmp/nbody_smoke \
#     bash leaderboards/nbody/gpu_run.sh
set -u
START=$(date +%s)
OUT=${OUT:-results}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-5000}
TOKENS=${TOKENS:-"1024 4096 16384"}
DEADLINE_S=${DEADLINE_S:-520}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-150}
EVAL_SIZE=${EVAL_SIZE:-5000}
TRAIN_SIZE=${TRAIN_SIZE:-1000}
PROBE_STEPS=${PROBE_STEPS:-20}
STAGES=${STAGES:-"bench train"}
BENCH_ARGS=${BENCH_ARGS---cuda-graphs}
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
mkdir -p "$OUT"
LOG="$OUT/log.txt"
elapsed() { echo $(( $(date +%s) - START )); }
if [ -d .whl ] && ! python3 -c "import jsonargparse" 2>/dev/null; then  # only LightningCLI needs these; harmless
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the source tree as an importable package without installing it: equiformer.datasets / .tasks
[ -e equiformer/datasets ] || ln -s ../datasets equiformer/datasets
[ -e equiformer/tasks ] || ln -s ../tasks equiformer/tasks
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
} >> "$LOG" 2>&1

if has bench; then
  echo "== [$(elapsed) s] bench_gatr.py (fp32 + bf16 autocast; tokens $TOKENS; $BENCH_ARGS)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout -k 5 "$BENCH_TIMEOUT_S" python3 benchmarks/bench_gatr.py --device "$DEVICE" --tokens $TOKENS \
    --warmup 2 --repeats 5 --out "$OUT/bench_gatr.json" --markdown "$OUT/bench_gatr.md" $BENCH_ARGS >> "$LOG" 2>&1
  echo "   bench exit $? after $(elapsed) s" | tee -a "$LOG"
fi
if has compile; then
  echo "== [$(elapsed) s] bench_gatr.py --compile-only (bf16; 4096 16384 tokens)" | tee -a "$LOG"
  timeout -k 5 "${COMPILE_TIMEOUT_S:-240}" python3 benchmarks/bench_gatr.py --device "$DEVICE" --tokens 4096 16384 \
    --precisions bf16 --compile-only --warmup 2 --repeats 5 --out "$OUT/bench_gatr_compile.json" >> "$LOG" 2>&1
  echo "   compile bench exit $? after $(elapsed) s" | tee -a "$LOG"
fi
if has gputests; then
  echo "== [$(elapsed) s] pytest -m gpu (GATr, n-body)" | tee -a "$LOG"
  timeout -k 5 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_ga_layers.py tests/test_nbody.py >> "$LOG" 2>&1
  echo "   gpu tests exit $? after $(elapsed) s" | tee -a "$LOG"
fi
has train || { echo "== summary"; grep -h "^| \|passed\|failed\|Error" "$LOG" | tail -40; echo "total $(elapsed) s"; exit 0; }

# training budget: what is left before the deadline, less ~35 s for imports, the last test and margin;
# run.py stops training (Lightning max_time) at LEFT - 20 s after its plan starts, whatever the probe said
LEFT=$(( DEADLINE_S - $(elapsed) ))
BUDGET=$(( LEFT - 35 ))
[ "$BUDGET" -lt 30 ] && BUDGET=30
echo "== [$(elapsed) s] run.py: $STEPS steps requested, training budget $BUDGET s" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout -k 5 "$(( LEFT > 40 ? LEFT : 40 ))" python3 leaderboards/nbody/run.py --models gatr transformer egnn \
  --steps "$STEPS" --budget-s "$BUDGET" --deadline-s "$(( BUDGET + 15 ))" --probe-steps "$PROBE_STEPS" \
  --device "$DEVICE" --train-size "$TRAIN_SIZE" --eval-size "$EVAL_SIZE" --root /tmp/nbody_data \
  --run-dir /tmp/nbody_runs --out "$OUT/nbody.json" ${RUN_ARGS:-} >> "$LOG" 2>&1
echo "   run.py exit $? after $(elapsed) s" | tee -a "$LOG"

echo "== summary" | tee -a "$LOG"
grep -h "^probe\|^plan\|stopped\|Error\|error:\|^| " "$LOG" | grep -v "Warning" | tail -40
echo "total $(elapsed) s"
