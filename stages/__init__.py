"""Pipeline stages (download, prepare, finetune, evaluate, saliency, activations)
and the few shared modules they import (params, fileio, data, model, ...).

A stage module never imports another stage module; `dvc.yaml` is the map of the data flow.
"""
