#!/usr/bin/env bash
# make demo: copy the working tree (tracked and untracked-but-not-ignored files) into demo/,
# apply params-demo.yaml on top of params.yaml there, and run the whole pipeline with DVC.
# The project's own params.yaml, data/ and metrics/ stay untouched.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
demo="$root/demo"
export PATH="$root/.venv/bin:$PATH"
rm -rf "$demo"
mkdir -p "$demo"
cd "$root"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$demo"
cd "$demo"
python -m cnnlens.config merge "$root/params.yaml" "$root/params-demo.yaml" -o params.yaml
git init -q && git add -A && git -c user.name=demo -c user.email=demo@localhost commit -qm "demo" 
start=$(date +%s)
dvc repro
# the offline page template (vega inlined, reading order): see cnnlens/report.py
template="$root/build/plots.html"
[ -f "$template" ] || python -m cnnlens.report template -o "$template"
dvc plots show -q --html-template "$template" -o dvc_plots >/dev/null
python -m cnnlens.report shrink dvc_plots  # 256-colour copies of the page's images (sizes: BENCHMARKS.md)
echo "demo: pipeline done in $(( $(date +%s) - start )) s. Results in demo/: metrics/*.json, plots/, models/;" \
     "open demo/dvc_plots/index.html for all plots." >&2
python -m cnnlens.results  # the headline: accuracy, best epoch, kernels, saliency quality vs random
echo "more: (cd demo && dvc metrics show); make compare (the four losses as experiments, side by side)" >&2
