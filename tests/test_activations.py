"""cnnlens/hooks.py and the activations stage, against a reference forward pass and hand-made tensors.

The reference for every hooked activation runs the ResNet's children one by one
(conv1 -> bn1 -> relu -> maxpool = stem, then layer1..layer4), the same operations in the same
order as ResNet.forward, so hooked and reference tensors must be bitwise equal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import checkpoint_meta, run_stage, small_resnet, write_shards
from PIL import Image
from torch import nn

import stages.activations as stage
from cnnlens import hooks as F
from cnnlens.cli import run_main
from cnnlens.errors import StageError
from cnnlens.model import build_model, load_checkpoint, save_checkpoint
from cnnlens.tensors import Split, eval_inputs, normalize_maps

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["stem", "layer1", "layer2", "layer3", "layer4"]
SIDE, CROP = 72, 64  # packed square side and network input: resnet18 maps of 16, 16, 8, 4, 2 pixels
VAL_PATHS = [
    "val/ants/a0.jpg",
    "val/ants/a1.jpg",
    "val/ants/same.jpg",
    "val/ants/flat.jpg",
    "val/bees/b0.jpg",
    "val/bees/same.jpg",
    "val/bees/b2.jpg",
]


def reference_forward(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        out["stem"] = h
        for name in LAYERS[1:]:
            h = getattr(model, name)(h)
            out[name] = h
    return out


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A prepared dir and a models dir as the prepare and finetune stages write them."""
    root = tmp_path_factory.mktemp("activations")
    g = torch.Generator().manual_seed(3)
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    val_images = torch.randint(0, 256, (len(VAL_PATHS), 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    val_images[VAL_PATHS.index("val/ants/flat.jpg")] = 128  # a constant image
    labels = torch.tensor([0 if "/ants/" in p else 1 for p in VAL_PATHS])
    splits = {
        "val": Split(val_images, labels, VAL_PATHS, None),
        "train": Split(
            val_images[:2].clone(), labels[:2].clone(), ["train/ants/t0.jpg", "train/ants/t1.jpg"], None
        ),
    }
    write_shards(prepared / "shards", splits, SIDE)
    (prepared / "classes.json").write_text(json.dumps(["ants", "bees"]))
    model = small_resnet(bn_bias=(-0.3, 0.2))
    meta = checkpoint_meta(CROP)
    save_checkpoint(root / "models", model, meta)
    return {
        "root": root,
        "prepared": prepared,
        "models": root / "models",
        "model": model,
        "images": val_images,
    }


def write_params(path: Path, **activations) -> Path:
    base = {"num_images": 2, "max_maps": 4, "batch_size": 3, "device": "cpu", "layers": LAYERS}
    path.write_text(yaml.safe_dump({"activations": {**base, **activations}}))
    return path


def stage_argv(project, tmp_path, params) -> list[str]:
    out = {
        "--metrics": tmp_path / "metrics" / "activations.json",
        "--out": tmp_path / "plots" / "activations",
    }
    paths = {"--data": project["prepared"], "--model": project["models"], **out, "--params": params}
    return [str(a) for flag, path in paths.items() for a in (flag, path)]


def run_activations(project, tmp_path, **activations):
    params = write_params(tmp_path / "params.yaml", **activations)
    return run_stage("activations", *stage_argv(project, tmp_path, params), timeout=120)


# ---------------------------------------------------------------- hooks


def test_hooked_activations_equal_the_children_forward(project):
    model = project["model"]
    x = eval_inputs(project["images"], CROP)
    modules = F.resolve_layers(model, LAYERS, CROP)
    with F.capture(modules) as acts, torch.no_grad():
        model(x)
    ref = reference_forward(model, x)
    assert list(acts) == LAYERS
    for name in LAYERS:
        assert torch.equal(acts[name], ref[name]), name
    assert [tuple(acts[n].shape[1:]) for n in LAYERS] == [
        (64, 16, 16),
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
    ]
    assert no_hooks(model)


def test_hooks_are_removed_after_an_error(project):
    model = project["model"]
    modules = F.resolve_layers(model, ["stem", "layer3"], CROP)
    with pytest.raises(RuntimeError, match="boom"):
        with F.capture(modules):
            assert len(model.maxpool._forward_hooks) == 1 and len(model.layer3._forward_hooks) == 1
            raise RuntimeError("boom")
    assert no_hooks(model)


def test_resnet_layer_names_and_unknown_name_lists_the_available_ones(project):
    model = project["model"]
    assert F.available_layers(model, CROP) == {
        "stem": "maxpool",
        "layer1": "layer1",
        "layer2": "layer2",
        "layer3": "layer3",
        "layer4": "layer4",
    }
    assert F.resolve_layers(model, ["layer2", "stem"], CROP) == {
        "layer2": model.layer2,
        "stem": model.maxpool,
    }
    with pytest.raises(StageError, match=r"'layer5'.*available: stem, layer1, layer2, layer3, layer4"):
        F.resolve_layers(model, ["stem", "layer5"], CROP)
    with pytest.raises(StageError, match="empty"):
        F.resolve_layers(model, [], CROP)


def test_mobilenet_blocks_are_mapped_by_output_stride_without_touching_the_model():
    model = build_model("mobilenet_v3_small", 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # torchvision's mobilenet_v3_small config: block strides 2 | 2 | 2, 1 | 2, 1, 1, 1, 1 | 2, 1, 1 | last conv
    expected = {
        "stem": "features.0",
        "layer1": "features.1",
        "layer2": "features.3",
        "layer3": "features.8",
        "layer4": "features.12",
    }
    assert F.available_layers(model, 64) == expected
    assert model.training  # mode restored, and the probe ran in eval mode: no running statistics changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_unknown_architecture_is_refused_clearly():
    with pytest.raises(StageError, match="ResNets and models with a `features` Sequential"):
        F.available_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 32)


# ---------------------------------------------------------------- grids


def test_top_maps_orders_by_mean_and_each_map_is_scaled_on_its_own():
    act = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # mean 1
            [[0.0, 6.0], [3.0, 3.0]],  # mean 3
            [[2.0, 2.0], [2.0, 2.0]],  # mean 2, constant
            [[-3.0, 9.0], [3.0, 3.0]],  # mean 3 (tie with channel 1: lower channel first)
            [[0.0, 0.0], [0.0, 0.0]],
        ]
    )  # mean 0, constant
    idx, means = F.top_maps(act, 3)
    assert idx.tolist() == [1, 3, 2]
    assert means.tolist() == [3.0, 3.0, 2.0]
    scaled = normalize_maps(act[idx])
    assert torch.equal(scaled[0], torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    assert torch.equal(scaled[1], torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    assert torch.equal(scaled[2], torch.zeros(2, 2))  # constant map -> zeros, not NaN
    idx_all, _ = F.top_maps(act, 100)  # k larger than the channel count: every channel once
    assert sorted(idx_all.tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(normalize_maps(act[4:]), torch.zeros(1, 2, 2))


def test_a_constant_input_image_gives_no_nan_anywhere(project):
    model = project["model"]
    flat = torch.full((1, 3, SIDE, SIDE), 77, dtype=torch.uint8)
    x = eval_inputs(flat, CROP)
    modules = F.resolve_layers(model, LAYERS, CROP)
    with F.capture(modules) as acts, torch.no_grad():
        model(x)
    for name, act in acts.items():
        idx, means = F.top_maps(act[0], 8)
        scaled = normalize_maps(act[0][idx])
        assert torch.isfinite(means).all() and torch.isfinite(scaled).all(), name
        assert scaled.min() >= 0 and scaled.max() <= 1
    stats = F.layer_statistics(model, modules, [x])
    assert all(math.isfinite(v) for s in stats.values() for v in s.values())


# ---------------------------------------------------------------- statistics


def test_layer_stats_on_a_hand_made_tensor_in_two_batches():
    # channel 0 over both batches: 0 2 | 4 0; channel 1: 0 0 | 0 6; channel 2: all 0 (dead)
    a = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    b = torch.tensor([[[[4.0, 0.0]], [[0.0, 6.0]], [[0.0, 0.0]]]])
    s = F.LayerStats()
    s.update(a)
    s.update(b)
    r = s.result()
    values = [0, 2, 4, 0, 0, 0, 0, 6, 0, 0, 0, 0]
    mean = sum(values) / 12  # 1.0
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 12)
    assert r["sparsity"] == 9 / 12
    assert r["mean"] == pytest.approx(mean, abs=1e-15)
    assert r["std"] == pytest.approx(std, rel=1e-12)
    assert (r["channels"], r["height"], r["width"], r["dead_channels"]) == (3, 1, 2, 1)
    with pytest.raises(ValueError, match="shape changed"):
        s.update(torch.zeros(1, 3, 2, 2))


def test_layer_statistics_equal_the_reference_forward_over_all_batches(project):
    model = project["model"]
    x = eval_inputs(project["images"], CROP)
    modules = F.resolve_layers(model, LAYERS, CROP)
    stats = F.layer_statistics(model, modules, x.split(3))
    # reference: the same batches (conv results may depend on batch size), children one by one
    parts = [reference_forward(model, xb) for xb in x.split(3)]
    assert list(stats) == LAYERS
    for name in LAYERS:
        ref = torch.cat([p[name] for p in parts]).double()
        s = stats[name]
        assert s["sparsity"] == (ref == 0).double().mean().item()
        assert 0.05 < s["sparsity"] < 0.95  # the ReLU zeros are real, and so are the non-zeros
        assert s["mean"] == pytest.approx(ref.mean().item(), rel=1e-10)
        assert s["std"] == pytest.approx(ref.std(unbiased=False).item(), rel=1e-8)
        assert (s["channels"], s["height"], s["width"]) == tuple(ref.shape[1:])
        assert s["dead_channels"] == int((ref.transpose(0, 1).flatten(1) == 0).all(1).sum())
    assert no_hooks(model)


# ---------------------------------------------------------------- the stage


def test_stage_writes_grids_metrics_and_plot_data(project, tmp_path):
    res = run_activations(project, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "activations: 2 image(s) x 5 layer(s)" in res.stderr
    out = tmp_path / "plots" / "activations"
    # num_images 2 of 7: the first and the last val image (select_images spreads them evenly)
    for stem in ("a0", "b2"):
        for layer in LAYERS:
            with Image.open(out / "grids" / stem / f"{layer}.png") as im:
                assert im.format == "PNG" and im.width > 300
    assert sorted(p.name for p in out.iterdir()) == [
        "grids",
        "layers",
        "sparsity.csv",
        "sparsity.png",
        "stats.json",
    ]
    # one compact figure per layer, a row per image (the plots page shows these, not the grids)
    assert sorted(p.name for p in (out / "layers").iterdir()) == sorted(f"{layer}.png" for layer in LAYERS)
    for layer in LAYERS:
        with Image.open(out / "layers" / f"{layer}.png") as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["a0", "b2"]
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # atomic writes left no temporaries

    metrics = json.loads((out / "stats.json").read_text())  # every number; the declared metrics: headline
    assert list(metrics) == LAYERS
    model, meta = load_checkpoint(project["models"])
    x = eval_inputs(project["images"], meta["input_size"])
    expected = F.layer_statistics(model, F.resolve_layers(model, LAYERS, CROP), x.split(3))
    for name in LAYERS:
        assert set(metrics[name]) == {
            "sparsity",
            "mean",
            "std",
            "channels",
            "height",
            "width",
            "dead_channels",
        }
        for key, value in expected[name].items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-9), (name, key)
    table = pd.read_csv(out / "sparsity.csv")
    assert list(table.columns) == ["layer", "sparsity", "mean"]
    assert table["layer"].tolist() == LAYERS
    assert np.allclose(table["sparsity"], [metrics[n]["sparsity"] for n in LAYERS], rtol=1e-12)
    assert np.allclose(table["mean"], [metrics[n]["mean"] for n in LAYERS], rtol=1e-12)
    headline = json.loads((tmp_path / "metrics" / "activations.json").read_text())
    assert headline == {
        "mean_sparsity": pytest.approx(np.mean([metrics[n]["sparsity"] for n in LAYERS]), rel=1e-12),
        "dead_channels": sum(metrics[n]["dead_channels"] for n in LAYERS),
    }


def run_cli(project, tmp_path, capsys, **activations):
    """The stage's command line in this process (run_main turns a StageError into an exit code),
    to spare a second and third interpreter start."""
    params = write_params(tmp_path / "params.yaml", **activations)
    with pytest.raises(SystemExit) as exit_info:
        run_main(stage.main, stage_argv(project, tmp_path, params))
    return exit_info.value.code, capsys.readouterr().err


def test_stage_rejects_an_unknown_layer_name_and_lists_the_available_ones(project, tmp_path, capsys):
    code, err = run_cli(project, tmp_path, capsys, layers=["stem", "layer5"])
    assert code == 2  # a bad value in params.yaml
    assert "layer5" in err and "stem, layer1, layer2, layer3, layer4" in err
    assert (
        not (tmp_path / "metrics" / "activations.json").exists()
        and not (tmp_path / "plots" / "activations").exists()
    )


def test_stage_rejects_an_unknown_image_path(project, tmp_path, capsys):
    code, err = run_cli(project, tmp_path, capsys, images=["val/ants/a0.jpg", "val/ants/nope.jpg"])
    assert code == 1
    assert "val/ants/nope.jpg" in err and "not in the prepared val split" in err
    assert (
        not (tmp_path / "metrics" / "activations.json").exists()
        and not (tmp_path / "plots" / "activations").exists()
    )


def test_stage_removes_its_hooks_and_names_colliding_images_apart(project, tmp_path, monkeypatch):
    seen = []

    def load(models_dir):
        model, meta = load_checkpoint(models_dir)
        seen.append(model)
        return model, meta

    monkeypatch.setattr(stage, "load_checkpoint", load)
    params = write_params(
        tmp_path / "params.yaml",
        layers=["layer4", "stem"],
        max_maps=3,
        images=["val/ants/same.jpg", "val/bees/same.jpg", "val/ants/flat.jpg", "val/ants/flat.jpg"],
    )
    out = tmp_path / "act"
    stage.main(
        [
            "--data",
            str(project["prepared"]),
            "--model",
            str(project["models"]),
            "--metrics",
            str(tmp_path / "m.json"),
            "--out",
            str(out),
            "--params",
            str(params),
        ]
    )
    assert len(seen) == 1 and no_hooks(seen[0])
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["flat", "val_ants_same", "val_bees_same"]
    assert sorted(p.name for p in (out / "grids" / "flat").iterdir()) == ["layer4.png", "stem.png"]
    assert list(json.loads((out / "stats.json").read_text())) == ["layer4", "stem"]
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"mean_sparsity", "dead_channels"}


def test_an_empty_val_split_names_the_shards(project, tmp_path, capsys):
    """The prepare stage writes packed shards (data/prepared/shards/); the error says so, not val.pt."""
    from conftest import write_shards

    from cnnlens.tensors import Split

    empty = Split(
        torch.zeros(0, 3, SIDE, SIDE, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [], None
    )
    train = Split(
        project["images"][:2].clone(), torch.tensor([0, 1]), ["train/ants/t0.jpg", "train/bees/t1.jpg"], None
    )
    write_shards(tmp_path / "prepared" / "shards", {"train": train, "val": empty}, SIDE, 4, masks=False)
    params = write_params(tmp_path / "params.yaml")
    argv = stage_argv({**project, "prepared": tmp_path / "prepared"}, tmp_path, params)
    with pytest.raises(SystemExit) as exit_info:
        run_main(stage.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "val.pt" not in err
    assert "shards/index.json: the val split holds no images" in err, err
    assert (
        not (tmp_path / "metrics" / "activations.json").exists()
        and not (tmp_path / "plots" / "activations").exists()
    )
