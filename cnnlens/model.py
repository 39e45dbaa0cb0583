"""Building, loading and saving the classifier: an ImageNet network with a new head.

Weights are always read with torch.load(weights_only=True): a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cnnlens.errors import StageError
from cnnlens.files import atomic_path, load_torch, read_json, save_torch, sha256_file
from cnnlens.losses import LOSSES
from cnnlens.tensors import MEAN, STD, eval_inputs
from cnnlens.weights import backbone_state, describe_mismatch, head_name, imagenet_network

# The architectures, one registry (config validates model.arch against it). Any has a last Linear
# layer as its head and IMAGENET1K_V1 weights in torchvision.
ARCHS = {
    "resnet18": "ResNet-18, the tutorial's network (11.7 M parameters)",
    "resnet34": "ResNet-34 (21.8 M parameters)",
    "resnet50": "ResNet-50, bottleneck blocks (25.6 M parameters)",
    "mobilenet_v3_small": "MobileNetV3-Small, for small devices (2.5 M parameters)",
    "efficientnet_b0": "EfficientNet-B0 (5.3 M parameters)",
}


# models/model.json: the keys the stages read, and the SHA-256 of the model.pt it describes
CHECKPOINT_KEYS = ("arch", "classes", "input_size", "loss")
SHA_KEY = "model_sha256"


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """The ImageNet architecture with its 1000-way head replaced by `num_classes` outputs."""
    if arch not in ARCHS:
        raise StageError(f"unknown model.arch {arch!r}; allowed: {', '.join(ARCHS)}")
    model = imagenet_network(arch)
    name = head_name(model)
    old = get_module(model, name)
    set_module(model, name, nn.Linear(old.in_features, num_classes))
    return model


def load_backbone(model: nn.Module, state: dict, source: str) -> None:
    """Load ImageNet (or any) weights into everything but the head; the head keeps its fresh init.

    Every backbone tensor must be present with the right shape: a file for another architecture
    fails here with a clear message instead of training a half-initialised network.
    """
    given, problems = backbone_state(model, state)
    if problems:
        raise StageError(
            f"{source}: these weights do not fit {type(model).__name__}: {problems}; "
            "check model.arch and model.weights"
        )
    model.load_state_dict(given, strict=False)


def initial_model(arch: str, num_classes: int, weights_dir: str | Path) -> tuple[nn.Module, dict]:
    """The untuned network: downloaded weights (or random init) with a new head, as in the tutorial.

    The head's init comes from torch's global RNG: seed it first for reproducible runs.
    """
    info = read_json(Path(weights_dir) / "weights.json")
    model = build_model(arch, num_classes)
    if info.get("source") != "none":
        path = Path(weights_dir) / "weights.pth"
        state = load_torch(path, what="backbone weights")
        if not isinstance(state, dict):
            raise StageError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
        load_backbone(model, state, str(path))
    return model, info


def save_checkpoint(models_dir: str | Path, model: nn.Module, meta: dict) -> None:
    """models/model.pt (state_dict only) + models/model.json, written together atomically; model.json
    is `meta` plus the SHA-256 of the model.pt it describes (SHA_KEY), which load_checkpoint checks."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(models_dir) as tmp:
        tmp.mkdir()
        save_torch(state, tmp / "model.pt")
        meta = {**meta, SHA_KEY: sha256_file(tmp / "model.pt")}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def params_digest(values: dict) -> str:
    """SHA-256 (16 hex digits) of JSON-able params, keys sorted: which params shaped a checkpoint
    (model.json), and whether the nodes of a run were given the same params (distributed.same_params)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_meta(
    *,
    arch: str,
    classes: list[str],
    crop: int,
    resize: int,
    loss: str,
    mode: str,
    weights_info: dict,
    best_epoch: int,
    digest: str,
) -> dict:
    """models/model.json: what load_checkpoint and the later stages read (arch, classes, the input size,
    the normalisation, the loss whose probabilities apply), and where the weights came from."""
    return {
        "arch": arch,
        "classes": classes,
        "mean": MEAN,
        "std": STD,
        "input_size": crop,
        "resize": resize,
        "loss": loss,
        "mode": mode,
        "weights_source": weights_info.get("source"),
        "weights_sha256": weights_info.get("sha256"),
        "best_epoch": best_epoch,
        "params_digest": digest,  # params_digest of the params that shaped it
    }


def load_checkpoint(models_dir: str | Path) -> tuple[nn.Module, dict]:
    """The network of models_dir/model.pt in eval mode, and model.json as save_checkpoint was given it.
    model.pt must have the SHA-256 model.json records (a damaged or swapped file is one StageError
    line, never a model with other numbers), and fit the architecture and classes model.json names."""
    meta = checkpoint_info(models_dir)
    path = Path(models_dir) / "model.pt"
    check_sha256(path, meta.pop(SHA_KEY), Path(models_dir) / "model.json")
    state = load_torch(path, what="model checkpoint")
    model = build_model(meta["arch"], len(meta["classes"]))
    problems = describe_mismatch(model.state_dict(), state)
    if problems:
        raise StageError(
            f"{path} does not fit {meta['arch']} with {len(meta['classes'])} classes "
            f"(as {models_dir}/model.json says): {problems}; rerun `dvc repro finetune`"
        )
    model.load_state_dict(state)
    return model.eval(), meta


def checkpoint_info(models_dir: str | Path) -> dict:
    """models_dir/model.json, checked: the keys the stages read and the SHA-256 of model.pt. A
    model.json without that hash (written before checkpoints carried one) is refused: its model.pt
    cannot be checked, and rerunning finetune writes both anew."""
    path = Path(models_dir) / "model.json"
    meta = read_json(path)
    missing = [key for key in (*CHECKPOINT_KEYS, SHA_KEY) if not isinstance(meta, dict) or key not in meta]
    if SHA_KEY in missing and len(missing) == 1:
        raise StageError(
            f"{path}: no {SHA_KEY} (an older checkpoint, written before model.json recorded the SHA-256 "
            f"of model.pt), so {Path(models_dir) / 'model.pt'} cannot be checked; rerun `dvc repro finetune`"
        )
    if missing:
        raise StageError(
            f"{path}: not a checkpoint description (no {', '.join(missing)}); rerun `dvc repro finetune`"
        )
    return meta


def check_sha256(path: Path, expected: str, recorded_in: Path) -> None:
    """A StageError unless the file at `path` has the SHA-256 `expected` (hex), as `recorded_in` says."""
    if not path.exists():
        raise StageError(
            f"{path}: model checkpoint not found; run the stage that writes it first (dvc repro)"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise StageError(
            f"{path}: its SHA-256 {actual[:16]}... is not the {str(expected)[:16]}... that {recorded_in} "
            "records: the file is damaged (e.g. a corrupted object in the DVC cache or remote) or belongs to "
            "another run; rerun `dvc repro finetune` (with --force if DVC calls it unchanged), or restore a "
            "good copy (`dvc checkout models`, or `dvc pull` / `dvc fetch` from a remote that holds one)"
        )


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop: int,
    *,
    device: torch.device,
    amp: bool = False,
    batch_size: int = 128,
) -> torch.Tensor:
    """Logits for uint8 images (centre crop, normalised), in batches, returned as float32 on CPU."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_inputs(images[start : start + batch_size].to(device, non_blocking=True), crop)
        if amp and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class probabilities by the rule of the loss the model was trained with (losses.LOSSES)."""
    return LOSSES[loss].probabilities(logits.float())


@torch.no_grad()
def predictions(
    model: nn.Module, x: Tensor, loss: str = "cross_entropy", *, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """(pred N, prob N) on the CPU: the max-logit class (the saliency target) and its probability
    as the training loss models it."""
    model.eval()
    logits = torch.cat([model(chunk).float().cpu() for chunk in x.split(batch_size)])
    pred = logits.argmax(1)
    return pred, probabilities(logits, loss).gather(1, pred[:, None])[:, 0]


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in eval mode; on a CPU in channels_last memory format, where oneDNN's
    convolutions run about 1.3-1.4x faster, forward and backward (resnet18 at 64 px). The maps
    differ from the default layout's by float rounding only (~1e-7 of their max)."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model
