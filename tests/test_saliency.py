"""The saliency stage end to end on a tiny prepared dir with object masks, every method, checked against
cnnlens.attribution recomputed here, captum (test-only oracle) and hand-computed baselines."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import checkpoint_meta, make_prepared, make_weights_dir, run_stage, write_params

from cnnlens import attribution as A
from cnnlens import quality
from cnnlens.cli import run_main
from cnnlens.config import parse_params
from cnnlens.model import build_model, load_checkpoint, save_checkpoint
from cnnlens.tensors import eval_inputs, load_split, select_images
from stages import saliency as stage

CROP, SIDE = 48, 56  # 48 px: the CAM methods' auto layer is layer1, 12 x 12 (layer4 is 2 x 2)
METHODS = list(A.METHODS)  # every method: the defaults and the opt-in ones
CAMS = ["gradcam", "gradcam_plusplus", "hirescam", "layercam"]
SMALL = {
    "num_images": 3,
    "quality_images": 6,
    "smoothgrad_samples": 2,
    "ig_steps": 4,
    "gradshap_samples": 2,
    "occlusion_window": 16,
    "occlusion_stride": 16,
    "quality_steps": 4,
    "road_steps": 3,
    "bootstrap": 50,
    "batch_size": 8,
    "device": "cpu",
    "methods": METHODS,
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest on a busy 2-core machine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("saliency")
    prepared = make_prepared(root / "prepared", n_train=4, n_val=8, size=SIDE, masks=True)
    weights = make_weights_dir(root / "weights")
    torch.manual_seed(1)
    meta = checkpoint_meta(CROP)
    save_checkpoint(root / "models", build_model("resnet18", 2), meta)
    return {"root": root, "prepared": prepared, "weights": weights, "models": root / "models"}


def args(project, out, params):
    return [
        "--data",
        project["prepared"],
        "--model",
        project["models"],
        "--weights",
        project["weights"],
        "--metrics",
        out / "metrics" / "saliency.json",
        "--out",
        out / "plots" / "saliency",
        "--params",
        params,
    ]


@pytest.fixture(scope="module")
def full_run(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    params = write_params(out / "params.yaml", {"saliency": SMALL})
    done = run_stage("saliency", *args(project, out, params), env=ONE_THREAD, timeout=300)
    assert done.returncode == 0, done.stderr
    return {
        "out": out / "plots" / "saliency",
        "metrics": json.loads((out / "metrics" / "saliency.json").read_text()),
        "quality": json.loads((out / "plots" / "saliency" / "quality.json").read_text()),
        "stderr": done.stderr,
    }


def test_every_declared_output_exists(full_run, project):
    out = full_run["out"]
    chosen = select_images(load_split(project["prepared"], "val"), [], SMALL["num_images"])
    for name in METHODS:
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
        assert (out / "arrays" / f"{name}.npz").exists()
        for path in chosen.paths:
            assert (
                out / "figures" / name / (path.split("/")[-1].rsplit(".", 1)[0] + ".png")
            ).stat().st_size > 0
    for name in (
        "figures/before_after.png",
        "figures/randomization.png",
        "figures/quality.png",
        "randomization.csv",
        "quality.csv",
        "quality.json",
    ):
        assert (out / name).stat().st_size > 0
    # figures/ holds images only: dvc.yaml declares the folder as one image plot
    assert {f.suffix for f in (out / "figures").rglob("*") if f.is_file()} == {".png"}
    assert "deletion AUC" in full_run["stderr"] and "center" in full_run["stderr"]


def test_npz_holds_raw_maps_equal_to_gradient_and_captum(full_run, project):
    from captum.attr import Saliency

    model, _ = load_checkpoint(project["models"])
    chosen = select_images(load_split(project["prepared"], "val"), [], SMALL["num_images"])
    x = eval_inputs(chosen.images, CROP)
    target = model(x).argmax(1)
    for name in METHODS:
        channels = 3 if name in ("gradient", "smoothgrad", "integrated_gradients", "gradient_shap") else 1
        z = np.load(full_run["out"] / "arrays" / f"{name}.npz")
        assert z["maps"].shape == (len(x), channels, CROP, CROP) and z["maps"].dtype == np.float32
        assert np.allclose(z["inputs"], x.numpy(), atol=1e-6)
        assert z["target"].tolist() == target.tolist()
        assert z["paths"].tolist() == chosen.paths
    z = np.load(full_run["out"] / "arrays" / "gradient.npz")
    inputs, tgt = torch.from_numpy(z["inputs"]), torch.from_numpy(z["target"])
    assert np.allclose(z["maps"], A.gradient(model, inputs, tgt).numpy(), atol=1e-6, rtol=0)
    oracle = Saliency(model).attribute(inputs.clone().requires_grad_(True), target=tgt, abs=True)
    assert np.allclose(z["maps"], oracle.detach().numpy(), atol=1e-6, rtol=0)
    ig = np.load(full_run["out"] / "arrays" / "integrated_gradients.npz")["maps"]
    assert (ig < 0).any()  # stored raw (signed); only the figures and metrics take abs
    # the CAM methods on the auto layer (layer1 at 48 px), occlusion and GradientSHAP with the params' settings
    settings = {
        "gradcam_layer": "layer1",
        "occlusion_window": 16,
        "occlusion_stride": 16,
        "gradshap_samples": 2,
    }
    for name in [*CAMS, "occlusion", "gradient_shap"]:
        again = A.explain(name, model, inputs, target=tgt, seed=0, batch_size=SMALL["batch_size"], **settings)
        z = np.load(full_run["out"] / "arrays" / f"{name}.npz")["maps"]
        assert np.allclose(z, again.numpy(), atol=1e-5 * float(np.abs(z).max()), rtol=0), name


def test_quality_json_covers_methods_and_baselines_with_intervals(full_run):
    m = full_run["quality"]
    assert (
        m["n_images"] == SMALL["num_images"]
        and m["n_quality_images"] == SMALL["quality_images"]
        and m["masks"]
    )
    table = pd.read_csv(full_run["out"] / "quality.csv")
    for name in METHODS + ["random", "center"]:
        for metric in (
            "deletion_auc",
            "insertion_auc",
            "road_morf",
            "road_lerf",
            "pointing_game",
            "mass_inside",
        ):
            ci = m[name][metric]
            assert set(ci) == {"mean", "low", "high", "n"} and ci["n"] == SMALL["quality_images"]
            assert ci["low"] <= ci["mean"] <= ci["high"]
            row = table[(table.method == name) & (table.metric == metric)]
            assert row[["mean", "low", "high"]].values.tolist() == [[ci["mean"], ci["low"], ci["high"]]]
        assert m[name]["metric_passes"]["deletion_insertion"] == {
            "forward": 2 * (SMALL["quality_steps"] + 1),
            "backward": 0,
        }
        assert m[name]["metric_passes"]["road"] == {"forward": 2 * SMALL["road_steps"], "backward": 0}
    # occlusion: 16 px windows by 16 px on 48 px: 3 x 3 windows and the image itself, no backward
    costs = {
        "gradient": 1,
        "smoothgrad": 2,
        "integrated_gradients": 4,
        "occlusion": (10, 0),
        "gradient_shap": 2,
    }
    for name in METHODS:
        passes = costs.get(name, 1)
        passes = passes if isinstance(passes, tuple) else (passes, passes)
        assert (m[name]["passes"]["forward"], m[name]["passes"]["backward"]) == passes, name
        assert m[name]["seconds_per_image"] >= m[name]["method_seconds_per_image"] > 0
    assert m["gradcam_layer"] == {"name": "layer1", "grid": [12, 12], "asked": "auto"}
    assert "CAM layer layer1 (12 x 12)" in full_run["stderr"]
    # the table: every method and baseline, best deletion AUC first (quality.csv and figures/quality.png)
    means = [m[name]["deletion_auc"]["mean"] for name in dict.fromkeys(table.method)]
    assert list(dict.fromkeys(table.method)) == quality.ranked(m) and means == sorted(means)
    assert set(table.method) == {*METHODS, "random", "center"}
    assert 0 <= m["integrated_gradients"]["ig_completeness_error"]["mean"]
    # hand-computed baselines: the mask (the middle half of the 56 px square, 28 x 28 px, all inside the
    # 48 px crop) holds the centre, so the centre prior always points inside; uniform noise puts about
    # the mask's share of the area inside it
    assert m["center"]["pointing_game"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 6}
    assert m["random"]["mass_inside"]["mean"] == pytest.approx((SIDE // 2) ** 2 / CROP**2, abs=0.03)


def test_randomization_runs_for_one_pass_methods_on_cpu_and_says_which_it_skipped(full_run):
    m, rand = full_run["quality"], pd.read_csv(full_run["out"] / "randomization.csv")
    assert m["randomization_skipped"] == ["smoothgrad", "integrated_gradients", "occlusion", "gradient_shap"]
    assert sorted(rand.columns) == sorted(["gradient", *CAMS, "layer", "step"])
    assert rand.layer.tolist() == ["original", "fc", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"]
    assert rand.step.tolist() == list(range(7))
    for name in ("gradient", *CAMS):
        assert rand[name].iloc[0] == pytest.approx(1.0)  # the unmodified copy gives the same map
        assert m[name]["randomization_rho"] == rand[name].iloc[-1]
    assert m["smoothgrad"]["randomization_rho"] is None
    assert m["randomization_images"] == SMALL["quality_images"]
    assert m["gradient"]["metric_passes"]["randomization"] == {"forward": 7 + 1, "backward": 7 + 1}


def test_declared_metrics_are_the_headline_only(full_run):
    """metrics/saliency.json (what `dvc exp show` and `dvc metrics diff` show): per method and the random
    map the mean deletion AUC and (masks here) pointing game, the CAM grid side; nothing else (no timings:
    they differ per run)."""
    m, q = full_run["metrics"], full_run["quality"]
    assert list(m) == [*METHODS, "random", "gradcam_grid"]
    for name in [*METHODS, "random"]:
        assert m[name] == {k: q[name][k]["mean"] for k in ("deletion_auc", "pointing_game")}
    assert q["seconds"] > 0 and m["gradcam_grid"] == 12


def test_explicit_image_list_is_explained_in_its_order(project, tmp_path):
    chosen = ["val/bees/005.png", "val/ants/002.png"]
    params = write_params(
        tmp_path / "params.yaml",
        {
            "saliency": {
                **SMALL,
                "images": chosen,
                "methods": ["gradcam"],
                "randomization": False,
                "before_after": False,
                "normalize": "percentile",
                "percentile": 95.0,
            }
        },
    )
    run_main(
        stage.main, [str(a) for a in args(project, tmp_path, params)]
    )  # in this process: no second start-up
    out = tmp_path / "plots" / "saliency"
    z = np.load(out / "arrays" / "gradcam.npz")
    assert z["paths"].tolist() == chosen and z["maps"].shape == (2, 1, CROP, CROP)
    assert sorted(p.name for p in (out / "figures" / "gradcam").glob("*.png")) == ["002.png", "005.png"]
    assert not (out / "figures" / "before_after.png").exists() and not (out / "randomization.csv").exists()


def run_cli(project, tmp_path, capsys, **saliency):
    params = write_params(tmp_path / "params.yaml", {"saliency": {**SMALL, **saliency}})
    with pytest.raises(SystemExit) as exit_info:
        run_main(stage.main, [str(a) for a in args(project, tmp_path, params)])
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_image_path_is_refused_clearly(project, tmp_path, capsys):
    code, err = run_cli(project, tmp_path, capsys, images=["val/ants/000.png", "val/ants/nope.jpg"])
    assert code == 1
    assert "val/ants/nope.jpg" in err and "not in the prepared val split" in err
    assert (
        not (tmp_path / "metrics" / "saliency.json").exists()
        and not (tmp_path / "plots" / "saliency").exists()
    )


def test_empty_method_list_is_refused_clearly(project, tmp_path, capsys):
    code, err = run_cli(project, tmp_path, capsys, methods=[])
    assert code == 2
    assert "saliency.methods is empty" in err and "gradient" in err
    assert (
        not (tmp_path / "metrics" / "saliency.json").exists()
        and not (tmp_path / "plots" / "saliency").exists()
    )


def test_a_named_cam_layer_is_used_and_recorded_and_a_bad_one_stops_the_stage(project, tmp_path, capsys):
    small = {**SMALL, "methods": ["gradcam", "layercam"], "randomization": False, "before_after": False}
    params = write_params(tmp_path / "params.yaml", {"saliency": {**small, "gradcam_layer": "layer3"}})
    run_main(stage.main, [str(a) for a in args(project, tmp_path, params)])
    full = json.loads((tmp_path / "plots" / "saliency" / "quality.json").read_text())
    assert full["gradcam_layer"] == {"name": "layer3", "grid": [3, 3], "asked": "layer3"}
    assert json.loads((tmp_path / "metrics" / "saliency.json").read_text())["gradcam_grid"] == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    capsys.readouterr()  # the good run's log
    code, err = run_cli(project, bad, capsys, gradcam_layer="layer9")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "saliency.gradcam_layer = 'layer9'" in lines[0]
    assert "layer1, layer2, layer3, layer4" in lines[0]
    assert not (bad / "metrics" / "saliency.json").exists() and not (bad / "plots" / "saliency").exists()


def test_quality_over_all_of_val_in_chunks_equals_one_chunk(project, tmp_path, monkeypatch):
    """quality_images: 0 scores every val image; a val split larger than QUALITY_CHUNK is scored chunk by
    chunk (bounded memory). For the deterministic methods and the centre baseline the per-image scores,
    and so the means and bootstrap intervals, must equal the one-chunk run's exactly."""
    small = {**SMALL, "quality_images": 0, "methods": ["gradient", "gradcam"], "randomization": False}
    small["before_after"] = False
    runs = {}
    for chunk in (256, 3):  # 8 val images: one chunk, then chunks of 3, 3 and 2
        monkeypatch.setattr(quality, "QUALITY_CHUNK", chunk)
        out = tmp_path / str(chunk)
        out.mkdir()
        params = write_params(out / "params.yaml", {"saliency": small})
        run_main(stage.main, [str(a) for a in args(project, out, params)])
        runs[chunk] = json.loads((out / "plots" / "saliency" / "quality.json").read_text())
    for name in ("gradient", "gradcam", "center"):
        one, chunked = runs[256][name], runs[3][name]
        scores = [k for k, v in one.items() if isinstance(v, dict) and "mean" in v]
        assert scores and all(chunked[k] == one[k] for k in scores), name
    assert runs[3]["n_quality_images"] == runs[256]["n_quality_images"] == 8  # every val image, none dropped


def test_without_masks_the_pointing_game_is_n_a_and_left_out(project, tmp_path, capsys):
    """Real data has no object masks: the pointing game does not apply. The log says n/a (not nan) and
    neither JSON has the key."""
    plain = {**project, "prepared": make_prepared(tmp_path / "prepared", n_train=2, n_val=4, size=SIDE)}
    small = {**SMALL, "methods": ["gradient"], "randomization": False, "before_after": False}
    params = write_params(tmp_path / "params.yaml", {"saliency": small})
    run_main(stage.main, [str(a) for a in args(plain, tmp_path, params)])
    err = capsys.readouterr().err
    rows = {line.split()[0]: line.split()[1:] for line in err.splitlines() if line.startswith("  ")}
    assert rows["gradient"][4:] == ["n/a", "n/a"] and rows["center"][4] == "n/a"  # pointing, rand. rho
    assert "nan" not in err
    metrics = json.loads((tmp_path / "metrics" / "saliency.json").read_text())
    assert metrics["gradient"].keys() == metrics["random"].keys() == {"deletion_auc"}
    assert "gradcam_grid" not in metrics  # no CAM method ran
    full = json.loads((tmp_path / "plots" / "saliency" / "quality.json").read_text())
    assert not full["masks"] and "pointing_game" not in full["gradient"]


def test_quick_keeps_the_maps_and_scores_less_and_says_so(full_run, project, tmp_path, capsys, monkeypatch):
    """saliency.quick: the shown images' maps and figures as the full run's; quality on those images (their
    maps made once, not again for the scoring), deletion/insertion at most 8 steps, no ROAD, no
    randomisation check; quality.json, the metrics and the log say quick."""
    made = []
    explain = quality.explain
    monkeypatch.setattr(
        quality, "explain", lambda name, *a, **kw: made.append(name) or explain(name, *a, **kw)
    )
    params = write_params(
        tmp_path / "params.yaml", {"saliency": {**SMALL, "quick": True, "before_after": False}}
    )
    run_main(stage.main, [str(a) for a in args(project, tmp_path, params)])
    out, full = tmp_path / "plots" / "saliency", full_run["out"]
    q = json.loads((out / "quality.json").read_text())
    metrics = json.loads((tmp_path / "metrics" / "saliency.json").read_text())
    assert made == METHODS  # once each: the shown images are the scored ones
    for name in METHODS:
        a, b = np.load(out / "arrays" / f"{name}.npz"), np.load(full / "arrays" / f"{name}.npz")
        assert all(np.array_equal(a[k], b[k]) for k in ("maps", "inputs", "target", "paths")), name
        assert (out / "figures" / f"{name}.png").read_bytes() == (
            full / "figures" / f"{name}.png"
        ).read_bytes()
        assert "road_morf" not in q[name] and q[name]["randomization_rho"] is None
        assert q[name]["metric_passes"]["deletion_insertion"]["forward"] == 2 * (SMALL["quality_steps"] + 1)
        assert "road" not in q[name]["metric_passes"] and "randomization" not in q[name]["metric_passes"]
    assert q["quick"] is True and metrics["quick"] is True and "quick" not in full_run["quality"]
    assert q["n_quality_images"] == SMALL["num_images"] and q["random"]["deletion_auc"]["n"] == 3
    assert q["randomization_images"] == 0 and not (out / "randomization.csv").exists()
    assert "quick: quality on the shown images" in capsys.readouterr().err
    # the defaults' 16 steps become 8 (SMALL's 4 stay 4)
    sp = parse_params({"saliency": {"quick": True}}).saliency
    found = quality.scoring(**{key: getattr(sp, key) for key in stage.SCORING})
    assert found == {"quality_steps": quality.QUICK_STEPS, "road_steps": 0, "randomization": False}
