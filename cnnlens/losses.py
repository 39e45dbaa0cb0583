"""The training losses, one registry: each maps (logits N x C, labels N) to a scalar and has its
own rule for turning logits into class probabilities. The prediction is always argmax of logits.

config.py validates train.loss against LOSSES; make_loss builds the training loss from it, and
evaluation and saliency read each loss's probabilities.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def cross_entropy(logits, labels, *, label_smoothing: float):
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def bce_with_logits(logits, labels):
    """Sigmoid + binary cross-entropy on one-hot targets over the same C logits."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def focal(logits, labels, *, focal_gamma: float):
    """Lin et al. 2017: cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-((1 - logp.exp()) ** focal_gamma) * logp).mean()


def multi_margin(logits, labels):
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
    fn: Callable  # (logits, labels, **options) -> scalar tensor
    probabilities: Callable  # float logits N x C -> probabilities N x C
    description: str
    options: tuple[str, ...] = ()  # the keyword arguments of fn that make_loss passes on


LOSSES = {
    "cross_entropy": Loss(
        cross_entropy, softmax, "softmax cross-entropy (train.label_smoothing applies)", ("label_smoothing",)
    ),
    "bce_with_logits": Loss(bce_with_logits, renormalised_sigmoid, "one sigmoid per class, one-hot targets"),
    "focal": Loss(
        focal, softmax, "cross-entropy down-weighting easy images by (1 - p)^focal_gamma", ("focal_gamma",)
    ),
    "multi_margin": Loss(
        multi_margin, softmax, "hinge on the logits; its softmax is a score, not calibrated"
    ),
}


def make_loss(name: str, *, label_smoothing: float, focal_gamma: float) -> Callable:
    """The loss `name` of LOSSES as a callable (logits, labels) -> scalar, with the options it uses."""
    options = {"label_smoothing": label_smoothing, "focal_gamma": focal_gamma}
    loss = LOSSES[name]
    return functools.partial(loss.fn, **{key: options[key] for key in loss.options})
