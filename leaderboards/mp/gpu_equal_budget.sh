#!/usr/bin/env bash
# One GPU call: iComFormer, Crystalformer (ours) and CGCNN (peer) on Materials Project formation energy
# and band gap, each model alone on the GPU for BUDGET_S seconds per target, one after the other; then
# tested, and the best shippable model per target exported as mp-eform / mp-gap. Run from the repository
# root on the GPU machine:
#   BUDGET_S=65 OUT=results bash leaderboards/mp/gpu_equal_budget.sh
# 3 models x 2 targets x (65 s + ~8 s overhead) + pip/imports ~ 480 s; DEADLINE_S (default 540 s after
# the start of this script) skips any run that would end later, so the call stays under 560 s.
# Needs (both folders git-ignored via .git/info/exclude, carried with the call):
#   .carry_mp/: python leaderboards/mp/prepare_carry.py   (processed MP tensors + MEGNet split files; no pymatgen on the GPU)
#   .whl/: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#            ase==3.29.0 jsonargparse==4.53.0 docstring-parser typeshed-client
# The GPU image has torch, e3nn, torch-geometric, lightning, safetensors; not ase, jsonargparse or pymatgen.
# Writes to OUT: results.json (every run: MAE, epochs, structures/s, validation curve; paper numbers),
# curves.csv, run.log, pretrained/mp-eform.{json,safetensors}, pretrained/mp-gap.{json,safetensors}.
set -u
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-65}
OUT=${OUT:-results}
DEADLINE_S=${DEADLINE_S:-540}
MODELS=${MODELS:-crystalformer icomformer cgcnn}
TARGETS=${TARGETS:-e_form gap}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the source tree as an importable package without installing it: equiformer.datasets / .tasks
[ -e equiformer/datasets ] || ln -s ../datasets equiformer/datasets
[ -e equiformer/tasks ] || ln -s ../tasks equiformer/tasks
[ -d .carry_mp/cache ] || { echo "missing .carry_mp/ (run leaderboards/mp/prepare_carry.py and carry it)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
LEFT=$(( DEADLINE_S - ($(date +%s) - T0) ))
# shellcheck disable=SC2086  # MODELS / TARGETS / EXTRA are word lists
python3 leaderboards/mp/equal_budget.py --models $MODELS --targets $TARGETS --budget-s "$BUDGET_S" \
  --deadline-s "$LEFT" --root .carry_mp/cache --data-dir .carry_mp/data --num-workers 6 \
  --out "$OUT" --work /tmp/mp_work --export-dir "$OUT/pretrained" $EXTRA > "$OUT/run.log" 2>&1
rc=$?
grep -h "^\[\|exported\|Error\|error\|Traceback" "$OUT/run.log" | grep -v 'Warning\|warnings.warn\|"error": null' | tail -40
echo "total $(( $(date +%s) - T0 )) s, rc $rc"
exit $rc
