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
python -m stages.params merge "$root/params.yaml" "$root/params-demo.yaml" -o params.yaml
git init -q && git add -A && git -c user.name=demo -c user.email=demo@localhost commit -qm "demo" 
start=$(date +%s)
dvc repro
dvc plots show -q -o dvc_plots >/dev/null
echo "demo: pipeline done in $(( $(date +%s) - start )) s. Results in demo/: metrics/*.json, plots/, models/;" \
     "open demo/dvc_plots/index.html for all plots." >&2
dvc metrics show >&2
