#!/usr/bin/env bash
# The whole GPU check in one run (<= 8 minutes on an H100/H200); see docs/gpu.md.
#   bash bench/gpu_check.sh --device cuda --out "$OUT"      # on the GPU box (.gpu/hymenoptera_data carried)
#   bash bench/gpu_check.sh --device cpu --tiny             # the CPU dry run
# Options: --device cuda|cpu (default cuda), --tiny, --data DIR (default .gpu/hymenoptera_data),
#          --out DIR (default $OUT if set, else gpu-out/), --skip tests,pipeline,bench,saliency.
# Steps (each logged; a failed one is recorded and the next still runs): 1. pytest -m cuda,
# 2. the six stages in dvc.yaml order WITHOUT DVC (not installed there), 3. bench/bench_train.py,
# 4. gradient saliency for all val images, timed. Leaves summary.json, summary.txt and
# gpu_check.tar.gz (logs + metrics/*.json + bench JSON) directly in the out folder.
set -o pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=$(command -v python3 || command -v python); fi
fi
out=${OUT:-gpu-out}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--out" ] && out=${args[$((i + 1))]}
done
mkdir -p "$out"
echo "gpu_check: $("$py" --version 2>&1) at $py; DVC is not used (the stage modules run in dvc.yaml order)" >&2
"$py" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=$?
echo "gpu_check: exit $rc; results in $out: summary.json summary.txt gpu_check.tar.gz gpu_check.log" >&2
exit $rc
