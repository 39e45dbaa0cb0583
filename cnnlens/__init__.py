"""cnnlens: the library behind the pipeline stages (decode, tensors, model, training, attribution, ...).

Stages in stages/ import it; it never imports a stage.
"""
