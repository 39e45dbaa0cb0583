"""The seven pipeline stages (download, prepare, finetune, evaluate, saliency, activations, export): entry points
that `dvc.yaml` runs as `python -m stages.X`. The library they call is the package `cnnlens`.

A stage never imports another stage, and `cnnlens` never imports a stage (tests/test_layout.py).
"""
