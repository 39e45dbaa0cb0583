"""The training losses, one registry: each maps (logits N x C, labels N) to a scalar and has its
own rule for turning logits into class probabilities. The prediction is always argmax of logits.

config.py validates train.loss against LOSSES; training, evaluation and saliency read it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def cross_entropy(logits, labels, tp):
    return F.cross_entropy(logits, labels, label_smoothing=tp.label_smoothing)


def bce_with_logits(logits, labels, tp):
    """Sigmoid + binary cross-entropy on one-hot targets over the same C logits."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def focal(logits, labels, tp):
    """Lin et al. 2017: cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-((1 - logp.exp()) ** tp.focal_gamma) * logp).mean()


def multi_margin(logits, labels, tp):
    """Multi-class hinge loss (margin 1) on the raw logits."""
    return F.multi_margin_loss(logits, labels)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)


def renormalised_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoids scaled to sum to 1: what bce_with_logits models, one yes/no per class."""
    p = torch.sigmoid(logits)
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Loss:
    fn: Callable  # (logits, labels, TrainParams) -> scalar tensor
    probabilities: Callable  # float logits N x C -> probabilities N x C
    description: str


LOSSES = {
    "cross_entropy": Loss(cross_entropy, softmax, "softmax cross-entropy (train.label_smoothing applies)"),
    "bce_with_logits": Loss(bce_with_logits, renormalised_sigmoid, "one sigmoid per class, one-hot targets"),
    "focal": Loss(focal, softmax, "cross-entropy down-weighting easy images by (1 - p)^focal_gamma"),
    "multi_margin": Loss(
        multi_margin, softmax, "hinge on the logits; its softmax is a score, not calibrated"
    ),
}
