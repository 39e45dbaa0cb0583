"""The GPU path, checked against the CPU path. Tests marked `cuda` skip with a reason where torch
sees no CUDA GPU (`pytest -m cuda tests/test_cuda.py` runs them on the GPU box, bench/gpu_check.sh
step 1). The unmarked tests check, on any machine, the pieces the GPU path is built from: the
graph's SGD update against torch.optim.SGD, and the dvclive-free logger the GPU box needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, loop_options, make_prepared, make_weights_dir, run_stage, write_params

from cnnlens.attribution import METHODS, explain
from cnnlens.live import log_epoch
from cnnlens.model import build_model, to_device
from cnnlens.tensors import load_split, normalize, random_resized_crop
from cnnlens.training import configure_torch, sgd_update, train

HAS_CUDA = torch.cuda.is_available()


def calibrated_model(x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """A seeded random-init ResNet-18 whose BatchNorm statistics are those of `x` (one forward in
    train mode with cumulative averaging), so its eval-mode logits have a sane scale instead of
    the ~1e4 that unit running variances give after 17 layers."""
    torch.manual_seed(seed)
    model = build_model("resnet18", 2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n smooth random images (uint8 -> normalised), smooth so they look more like photos than noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, size // 8, size // 8), generator=g).float()
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return normalize(img.round().clamp(0, 255).to(torch.uint8))


# -- on any machine ----------------------------------------------------------------------------


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.9, 1e-2), (0.0, 0.0)])
def test_sgd_update_matches_torch_sgd(momentum, weight_decay):
    """The graph's update (tensor lr) against torch.optim.SGD (float lr) over 20 steps and an lr
    change, from the same momentum buffers: equal up to float rounding (mul then add vs one fused
    add with alpha: <= 1 ulp per step, so 1e-6 relative after 20 steps is a wide margin)."""
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(64, 3, generator=g), torch.randn(7, generator=g)]
    mine = [p.clone() for p in ref]
    opt = torch.optim.SGD(
        [torch.nn.Parameter(p) for p in ref], lr=0.05, momentum=momentum, weight_decay=weight_decay
    )
    grads = [[torch.randn(p.shape, generator=g) for p in ref] for _ in range(20)]
    bufs = None
    neg_lr = torch.tensor(-0.05)
    for step, gs in enumerate(grads):
        if step == 10:
            opt.param_groups[0]["lr"] = 0.005
            neg_lr.fill_(-0.005)
        for p, gr in zip(opt.param_groups[0]["params"], gs):
            p.grad = gr.clone()
        opt.step()
        if bufs is None:  # the first step as torch takes it (buffer = gradient); the graph starts later
            wd = [gr + weight_decay * p for p, gr in zip(mine, gs)]
            bufs = [w.clone() for w in wd] if momentum else []
            torch._foreach_add_(mine, wd if not momentum else bufs, alpha=-0.05)
            continue
        sgd_update(mine, gs, bufs, neg_lr=neg_lr, momentum=momentum, weight_decay=weight_decay)
    for p, q in zip(opt.param_groups[0]["params"], mine):
        assert torch.allclose(p.detach(), q, rtol=1e-6, atol=1e-7), (p.detach() - q).abs().max()


def test_plain_live_writes_what_dvclive_writes(tmp_path):
    """Without dvclive (the GPU box) finetune writes the same files with the same contents."""
    live_mod = pytest.importorskip("dvclive")
    from cnnlens.live import PlainLive

    rows = [
        {"train_loss": 0.5, "lr": 0.001, "seconds": 1.25},
        {"train_loss": 0.25, "lr": 1e-4, "seconds": 2.0},
    ]
    with (
        live_mod.Live(str(tmp_path / "a"), dvcyaml=False, save_dvc_exp=False, report=None) as a,
        PlainLive(tmp_path / "b") as b,
    ):
        for row in rows:
            for live in (a, b):
                log_epoch(live, {"epoch": 1, **row})
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".json":
            assert json.loads((tmp_path / "a" / f).read_text()) == json.loads(
                (tmp_path / "b" / f).read_text()
            )
        else:
            assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text(), f


def test_finetune_imports_no_dvc():
    """The GPU box has neither dvc nor dvclive: importing the finetune stage must not need them."""
    code = (
        "import sys; sys.modules.update(dvc=None, dvclive=None, captum=None); "
        "import stages.finetune, stages.evaluate, stages.saliency, stages.activations, stages.prepare, "
        "stages.download"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr


# -- on a CUDA GPU -----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")
def test_bf16_channels_last_predicts_as_fp32():
    """bf16 autocast + channels_last (train.amp) vs fp32 (TF32 off) on 64 images at 224 px.

    bf16 keeps 8 significant bits, so every layer's output is rounded by up to 2^-9 = 0.2%; over
    ResNet-18's ~20 layers the logits move by a few % of their scale (the same check with CPU bf16
    autocast: 2.9% of the largest |logit|, softmax probabilities 0.005 apart, all 64 argmaxes equal).
    Bounds, with margin: logits within 8% of the largest |logit|; probabilities within 0.05; every
    image whose fp32 top-2 margin exceeds 16% (twice the logit bound, so no flip is possible) keeps
    its class; and >= 95% of all images keep theirs.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = batch(64, 224).cuda()
    model = calibrated_model(x.cpu()).cuda()
    with torch.no_grad():
        ref = model(x).float()
        fast_model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = fast_model(x.contiguous(memory_format=torch.channels_last)).float()
    p_ref, p_fast = ref.softmax(1), fast.softmax(1)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 0.08 * scale
    assert (p_ref - p_fast).abs().max() <= 0.05
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.16 * scale
    assert torch.equal(ref.argmax(1)[clear], fast.argmax(1)[clear])
    assert (ref.argmax(1) == fast.argmax(1)).float().mean() >= 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")
@pytest.mark.parametrize("flip", [True, False])
def test_random_resized_crop_on_gpu_equals_cpu(flip):
    """Same generator state -> the same boxes (drawn on the CPU) and the same pixels up to
    float rounding in grid_sample's bilinear weights (1e-4 in normalised units = 0.006 grey levels)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 3, 96, 96), generator=g, dtype=torch.uint8)
    cpu = random_resized_crop(images, 64, flip=flip, generator=torch.Generator().manual_seed(7))
    gpu = random_resized_crop(images.cuda(), 64, flip=flip, generator=torch.Generator().manual_seed(7))
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    assert (gpu.cpu() - cpu).abs().max() <= 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")
@pytest.mark.parametrize("name", list(METHODS))
def test_saliency_on_gpu_equals_cpu(name):
    """Every method's raw maps on CUDA (fp32, TF32 off) vs the CPU's: within 1e-4 of each image's map max
    for the one-pass methods (gradient, Grad-CAM); see below for the many-pass ones.
    With TF32 convolutions (cuDNN's default, 10-bit mantissa) they differ more; bench/gpu_check.py
    measures that difference for the saliency stage's default flags instead of asserting it."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = batch(4, 64)
    model = calibrated_model(x)
    settings = {"smoothgrad_samples": 4, "ig_steps": 8, "batch_size": 4, "seed": 0}
    target = model(x).argmax(1)
    cpu = explain(name, to_device(model, torch.device("cpu")), x, target=target, **settings)
    gpu = explain(name, to_device(model, torch.device("cuda")), x.cuda(), target=target, **settings)
    scale = cpu.abs().flatten(1).amax(1).clamp_min(1e-6 * float(cpu.abs().max()) + 1e-30)
    scale = scale.view(-1, *[1] * (cpu.dim() - 1))  # an all-zero Grad-CAM map is scored against the batch's
    err = (gpu - cpu).abs() / scale
    if METHODS[name].passes(**settings) == 1:
        assert err.max() <= 1e-4
    else:
        # SmoothGrad and IG take gradients at noisy or interpolated inputs, where many ReLUs sit near 0:
        # float rounding flips a few gates, which changes those gradients discontinuously. Measured on an
        # H200 (2026-11-27): max 1.8e-3 (SmoothGrad) and 9.8e-3 (IG) of the map's max, IG's mean 1.0e-4.
        # A few pixels may differ that much; the maps as a whole must agree.
        assert err.max() <= 5e-2 and err.mean() <= 5e-4
        assert torch.corrcoef(torch.stack([gpu.flatten(), cpu.flatten()]))[0, 1] >= 0.9999


TIMINGS = ("total_seconds", "images_per_second", "cuda_max_allocated_mb")


def tiny_training(tmp_path, n_train=26):
    prepared = make_prepared(tmp_path / "prepared", n_train=n_train, n_val=8, size=40)
    return load_split(prepared, "train"), load_split(prepared, "val")


def run_train(train_params: dict, splits, seed=0):
    device = torch.device("cuda")
    configure_torch(device, seed, threads=0, deterministic=False)
    # deterministic cuDNN kernels, not torch.use_deterministic_algorithms (train.deterministic sets both)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.manual_seed(seed)
    model = build_model("resnet18", 2)
    history = train(model, *splits, options=loop_options(**train_params), device=device, seed=seed)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, history


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_graphed_training_equals_eager(tmp_path, amp):
    """Two epochs at batch 4 on 26 images (6 full batches, then a batch of 2 that runs eagerly),
    StepLR dividing the lr by 10 after epoch 1: the CUDA-graph run (3 warm-up steps, then replays)
    ends with the eager run's weights up to float rounding (fp32, TF32 off: 1e-4 relative; bf16
    autocast: 2e-2, bf16's own resolution amplified over 14 steps). A graph that missed the lr change
    or the last partial batch would be off by ~the size of one update, far above these bounds."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    splits = tiny_training(tmp_path)
    base = dict(epochs=2, batch_size=4, lr=0.01, step_size=1, crop=32, amp=amp)
    eager, h_eager = run_train({**base, "cuda_graphs": "off"}, splits)
    graphed, h_graph = run_train({**base, "cuda_graphs": "on"}, splits)
    torch.backends.cudnn.deterministic = False
    assert h_graph.cuda_graphs and not h_eager.cuda_graphs
    tol = 2e-2 if amp else 1e-4
    moved = 0
    for k, v in eager.items():
        if v.is_floating_point():
            scale = v.abs().max().clamp_min(1e-3)
            assert (graphed[k] - v).abs().max() <= tol * scale, k
            moved += 1
    assert moved > 0
    assert h_graph.epochs[1]["lr"] == pytest.approx(0.001)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")
def test_deterministic_training_is_bit_identical_on_gpu(tmp_path):
    """train.deterministic: true, twice through the finetune stage on the GPU (bf16, the default params):
    bit-identical weights and identical metrics apart from timings. Passed on an H200 on 2026-11-27, when
    train.cuda_graphs defaulted to auto (graphs on)."""
    prepared = make_prepared(tmp_path / "prepared", n_train=26, n_val=8, size=40)
    weights = make_weights_dir(tmp_path / "weights")
    train_over = {"epochs": 2, "batch_size": 4, "crop": 32, "deterministic": True, "device": "cuda"}
    params = write_params(tmp_path / "params.yaml", {"train": train_over})
    states, metrics = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_stage(
            "finetune",
            *("--data", prepared, "--weights", weights, "--model", out / "models"),
            *("--metrics", out / "train.json", "--live", out / "live", "--params", params),
        )
        assert proc.returncode == 0, proc.stderr
        states.append(torch.load(out / "models" / "model.pt", weights_only=True))
        m = json.loads((out / "train.json").read_text())
        metrics.append({k: v for k, v in m.items() if k not in TIMINGS})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert metrics[0] == metrics[1]
