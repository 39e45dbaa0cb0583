"""Losses, prediction rules and the training loop over packed uint8 tensors.

The loop is the tutorial's (SGD + StepLR, keep the best-val-accuracy epoch) with the data path
replaced: the packed images live on the training device, augmentation is one batched op, and
on CUDA the model runs in bf16 autocast with channels_last.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.data import Split, eval_inputs, random_resized_crop
from stages.model import get_module, head_name, set_module
from stages.params import TrainParams


# ---- losses: each maps (logits N x C, labels N) to a scalar; the prediction is argmax of logits

def cross_entropy(logits, labels, tp: TrainParams):
    return F.cross_entropy(logits, labels, label_smoothing=tp.label_smoothing)


def bce_with_logits(logits, labels, tp: TrainParams):
    """Sigmoid + binary cross-entropy on one-hot targets over the same C logits."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def focal(logits, labels, tp: TrainParams):
    """Lin et al. 2017: cross-entropy scaled by (1 - p_true)^gamma; gamma=0 is cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** tp.focal_gamma * logp).mean()


def multi_margin(logits, labels, tp: TrainParams):
    """Multi-class hinge loss (margin 1) on the raw logits."""
    return F.multi_margin_loss(logits, labels)


LOSSES = {"cross_entropy": cross_entropy, "bce_with_logits": bce_with_logits,
          "focal": focal, "multi_margin": multi_margin}


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class probabilities as each loss models them: per-class sigmoids renormalised for
    bce_with_logits, softmax otherwise (for multi_margin a softmax of scores, not calibrated)."""
    logits = logits.float()
    if loss == "bce_with_logits":
        p = torch.sigmoid(logits)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.softmax(logits, dim=1)


# ---- the loop

@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = -1.0
    best_state: dict | None = None
    images_seen: int = 0
    train_seconds: float = 0.0


def configure(tp: TrainParams, device: torch.device, seed: int) -> None:
    torch.manual_seed(seed)
    if tp.threads:
        torch.set_num_threads(tp.threads)
    if device.type == "cuda":
        # fast by default; deterministic only when asked (disables cuDNN autotuning)
        torch.backends.cudnn.benchmark = not tp.deterministic
        torch.backends.cudnn.deterministic = tp.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def trainable_parameters(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """finetune: everything; feature_extractor: the head only (the backbone is frozen)."""
    head = get_module(model, head_name(model))
    if mode == "feature_extractor":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        return list(head.parameters())
    return list(model.parameters())


def set_train_mode(model: nn.Module, mode: str) -> None:
    """A frozen backbone stays in eval mode (its BatchNorm statistics frozen too); the head trains."""
    if mode == "feature_extractor":
        model.eval()
        get_module(model, head_name(model)).train()
    else:
        model.train()


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, crop: int, device: torch.device,
                   amp: bool = False, batch_size: int = 128) -> torch.Tensor:
    """Logits for uint8 images (centre crop, normalised), in batches, returned as float32 on CPU."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_inputs(images[start:start + batch_size].to(device, non_blocking=True), crop)
        if amp and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def backbone_features(model: nn.Module, images: torch.Tensor, crop: int, device, amp: bool) -> torch.Tensor:
    """What the head sees, for every image: the frozen backbone run once (train.cache_features)."""
    name = head_name(model)
    head = get_module(model, name)
    set_module(model, name, nn.Identity())
    try:
        return predict_logits(model, images, crop, device, amp)
    finally:
        set_module(model, name, head)


def train(model: nn.Module, train_split: Split, val_split: Split, tp: TrainParams, device: torch.device,
          seed: int, on_epoch=None) -> History:
    """Train `model` in place; returns the per-epoch history and the best-val-accuracy weights."""
    loss_fn = LOSSES[tp.loss]
    use_amp = tp.amp and device.type == "cuda"
    model.to(device)
    if use_amp:
        model.to(memory_format=torch.channels_last)
    params = trainable_parameters(model, tp.mode)
    optimizer = torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=tp.step_size, gamma=tp.gamma)
    generator = torch.Generator().manual_seed(seed)

    cached = tp.cache_features and tp.mode == "feature_extractor" and not tp.augment
    head = get_module(model, head_name(model))
    if cached:
        train_x = backbone_features(model, train_split.images, tp.crop, device, tp.amp).to(device)
        val_x = backbone_features(model, val_split.images, tp.crop, device, tp.amp).to(device)
    else:
        train_x = train_split.images.to(device)  # uint8: 244 x 3 x 256 x 256 is 48 MB
        val_x = val_split.images.to(device)
    train_y = train_split.labels.to(device)
    net = torch.compile(model) if tp.compile and not cached else model

    history = History()
    bar = tqdm(range(1, tp.epochs + 1), desc="finetune", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        start = time.perf_counter()
        set_train_mode(model, tp.mode)
        order = torch.randperm(len(train_y), generator=generator).to(device)
        total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(0, len(order), tp.batch_size):
            idx = order[i:i + tp.batch_size]
            if cached:
                x = train_x[idx]
            elif tp.augment:
                x = random_resized_crop(train_x[idx], tp.crop, scale=(tp.min_scale, 1.0), flip=tp.flip,
                                        generator=generator)
            else:
                x = eval_inputs(train_x[idx], tp.crop)
            if use_amp and not cached:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, tp.amp):
                logits = head(x) if cached else net(x)
                loss = loss_fn(logits.float(), train_y[idx], tp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == train_y[idx]).sum()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # validation: no grad, centre crop (or cached features)
        if cached:
            with torch.no_grad():
                head.eval()
                val_logits = head(val_x).float().cpu()
        else:
            val_logits = predict_logits(net, val_x, tp.crop, device, tp.amp)
        val_loss = float(loss_fn(val_logits, val_split.labels, tp))
        val_acc = float((val_logits.argmax(1) == val_split.labels).float().mean())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "train_loss": float(total_loss) / len(train_y),
               "train_acc": float(correct) / len(train_y), "val_loss": val_loss, "val_acc": val_acc,
               "lr": lr, "seconds": seconds}
        history.epochs.append(row)
        history.images_seen += len(train_y)
        history.train_seconds += seconds
        if val_acc > history.best_val_acc:
            history.best_val_acc, history.best_epoch = val_acc, epoch
            history.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}", val_acc=f"{val_acc:.3f}")
        if on_epoch:
            on_epoch(row)
    bar.close()
    return history
