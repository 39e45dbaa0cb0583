#!/usr/bin/env bash
# make compare: in the demo/ project of `make demo`, run the four losses as named DVC experiments
# (download, prepare and the weights are reused: only finetune and what follows run), then write
# ONE comparison to demo/compare/: comparison.md/.csv, accuracy_vs_saliency.png, saliency_by_loss.png,
# and plots/index.html (`dvc plots diff` of the four experiments on the offline page template).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
if [ ! -f "$root/demo/dvc.lock" ]; then
  echo "error: $root/demo has no finished pipeline; run \`make demo\` first" >&2
  exit 1
fi
template="$root/build/plots.html"
[ -f "$template" ] || python -m cnnlens.report template -o "$template"
cd "$root/demo"
start=$(date +%s)
# The three other losses train at once, as queued experiments in temporary workspaces, one process
# each with one thread: each run spends about half its time single-threaded (stage start-ups, DVC,
# figures), which the other runs' training fills. cross_entropy last, in the workspace: it is the
# demo's own setting, so it restores from the run-cache and the workspace ends where `make demo` left it.
losses=(bce_with_logits focal multi_margin)
dvc queue remove --all >/dev/null 2>&1 || true  # nothing left from an interrupted run
for loss in "${losses[@]}" cross_entropy; do
  dvc exp remove "loss-$loss" >/dev/null 2>&1 || true  # a rerun replaces the experiment
done
for loss in "${losses[@]}"; do
  dvc exp run --queue -q -n "loss-$loss" -S "train.loss=$loss"
done
echo "compare: training ${losses[*]} side by side (dvc exp run --run-all -j ${#losses[@]})" >&2
OMP_NUM_THREADS=1 dvc exp run --run-all -j "${#losses[@]}"
echo "compare: dvc exp run -n loss-cross_entropy -S train.loss=cross_entropy" >&2
dvc exp run -n loss-cross_entropy -S train.loss=cross_entropy
pairs=() exps=()
for loss in cross_entropy bce_with_logits focal multi_margin; do
  pairs+=("$loss=loss-$loss") exps+=("loss-$loss")
done
rm -rf compare
python -m cnnlens.compare --repo . --out compare "${pairs[@]}"
dvc plots diff -q "${exps[@]}" --html-template "$template" -o compare/plots >/dev/null
python -m cnnlens.report shrink compare/plots
echo "compare: done in $(( $(date +%s) - start )) s -> demo/compare/ (comparison.md, accuracy_vs_saliency.png," \
     "saliency_by_loss.png, plots/index.html)" >&2
