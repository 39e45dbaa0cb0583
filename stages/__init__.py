"""The seven pipeline stages (download, prepare, finetune, evaluate, saliency, activations, export): entry points
that `dvc.yaml` runs as `python -m stages.X`. The library they call is the package `cnnlens`.

A stage never imports another stage, and `cnnlens` never imports a stage (tests/test_layout.py).
"""

import gc
import sys

if sys.argv[:1] == ["-m"]:
    # `python -m stages.X`: runpy imports this package first, so the stage's imports (torch allocates about
    # 10^6 objects) run without the collector's passes over them, 0.15-0.35 s less per stage
    # (BENCHMARKS.md); cnnlens.cli.run_main freezes what was imported and turns the collector back on.
    gc.disable()
