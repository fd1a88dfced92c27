#!/usr/bin/env bash
# One GPU call: Equiformer (ours) and TorchMD-NET ET (peer) trained side by side on the same GPU
# for the same wall-clock budget, then tested; run from the repository root on the GPU machine.
#   BUDGET_S=360 OUT=results bash leaderboards/qm9/gpu_equal_budget.sh
# Needs (both folders git-ignored via .git/info/exclude, carried with the call):
#   .carry/qm9/: python -c "from equiformer.datasets.qm9 import QM9, export_compact_qm9; export_compact_qm9(QM9(), '.carry/qm9/qm9_all_compact.safetensors')"
#                gzip -6 .carry/qm9/qm9_all_compact.safetensors   # 47 -> 37 MB: with the shipped 14 MB model the
#                                                                 # tree must stay under the 64 MiB a call carries
#   .whl/: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#            ase==3.29.0 jsonargparse==4.53.0 docstring-parser typeshed-client
#          pip wheel --no-deps -w .whl torchmd-net==3.1.0   # pure Python; its Warp kernels are not used
# The GPU image has torch, e3nn, torch-geometric, lightning, safetensors; not ase or jsonargparse.
set -u
BUDGET_S=${BUDGET_S:-360}
OUT=${OUT:-results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the source tree as an importable package without installing it: equiformer.datasets / .tasks
[ -e equiformer/datasets ] || ln -s ../datasets equiformer/datasets
[ -e equiformer/tasks ] || ln -s ../tasks equiformer/tasks
mkdir -p /tmp/qm9 "$OUT"
for f in .carry/qm9/*.safetensors; do [ -e "$f" ] && cp "$f" /tmp/qm9/; done
for f in .carry/qm9/*.safetensors.gz; do [ -e "$f" ] && gunzip -c "$f" > "/tmp/qm9/$(basename "${f%.gz}")"; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# MODELS="equiformer torchmdnet_et" (default) trains them one after the other, each alone on the GPU
# (so each gets the whole GPU for BUDGET_S seconds); one model per call fits the 10-minute call limit.
for model in ${MODELS:-equiformer torchmdnet_et}; do
  export_arg=""
  [ "$model" = equiformer ] && export_arg="--export qm9-equiformer"
  python3 leaderboards/qm9/equal_budget.py --model "$model" --budget-s "$BUDGET_S" --root /tmp/qm9 \
    --num-workers 8 --out "$OUT" --ckpt-dir "/tmp/ckpt/$model" $export_arg > "$OUT/$model.log" 2>&1
done
grep -h "probe\|training\|exported\|Error\|error" "$OUT"/*.log | grep -v Warning
