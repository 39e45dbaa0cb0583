"""cnnlens: fine-tune a CNN and see what it looks at, reproducibly.

The library behind the pipeline stages (decode, tensors, model, training, attribution, ...).
Stages in stages/ import it; it never imports a stage.
"""

__version__ = "0.1.0"
