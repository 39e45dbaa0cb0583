"""params.yaml validation: every kind of mistake stops with exit code 2 and names key, value, choices."""

import pytest
import yaml
from conftest import ROOT, run_stage, write_params

from cnnlens.config import load_params, merge, parse_params
from cnnlens.errors import ParamsError


def test_project_params_and_demo_overrides_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.train.epochs == 25 and p.train.batch_size == 4 and p.train.lr == 0.001  # tutorial defaults
    assert p.train.step_size == 7 and p.train.gamma == 0.1 and p.train.momentum == 0.9
    assert p.data.source == "hymenoptera" and p.model.weights == "IMAGENET1K_V1"
    demo = parse_params(
        merge(
            yaml.safe_load((ROOT / "params.yaml").read_text()),
            yaml.safe_load((ROOT / "params-demo.yaml").read_text()),
        )
    )
    assert demo.data.source == "synthetic" and demo.model.weights == "none"


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"train": {"epochs": "ten"}}, ["train.epochs", "'ten'", "an integer"]),
        ({"train": {"lr": -1}}, ["train.lr", "-1", "at least 0"]),
        (
            {"train": {"loss": "hinge"}},
            ["train.loss", "'hinge'", "cross_entropy", "bce_with_logits", "focal"],
        ),
        ({"train": {"epoch": 3}}, ["unknown key train.epoch", "epochs"]),
        ({"trian": {}}, ["unknown key trian", "train"]),
        ({"saliency": {"methods": ["gradient", "lime"]}}, ["saliency.methods", "'lime'", "smoothgrad"]),
        ({"train": {"flip": "yes"}}, ["train.flip", "true or false"]),
        ({"prepare": {"on_bad_image": "ignore"}}, ["prepare.on_bad_image", "skip", "fail"]),
        ({"data": {"synthetic": {"image_size": 8}}}, ["data.synthetic.image_size", "between 32 and 2048"]),
        ({"train": 5}, ["train must be a mapping"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, words):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    for word in words:
        assert word in str(err.value)


def test_types_are_coerced_and_missing_keys_default():
    p = parse_params({"train": {"lr": 1}, "seed": 3})
    assert isinstance(p.train.lr, float) and p.train.lr == 1.0
    assert p.seed == 3 and p.train.epochs == 25


def test_stage_exits_2_with_one_clear_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"train": {"loss": "hinge"}})
    proc = run_stage(
        "finetune",
        "--data",
        tmp_path,
        "--weights",
        tmp_path,
        "--model",
        tmp_path / "m",
        "--metrics",
        tmp_path / "m.json",
        "--live",
        tmp_path / "live",
        "--params",
        params,
    )
    assert proc.returncode == 2
    assert "train.loss = 'hinge'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_merge_cli_validates(tmp_path):
    (tmp_path / "over.yaml").write_text("train: {batch_size: 0}\n")
    proc = run_stage("cnnlens.config", "merge", ROOT / "params.yaml", tmp_path / "over.yaml")
    assert proc.returncode == 2 and "train.batch_size = 0" in proc.stderr


def test_bare_on_off_read_as_yaml_booleans_still_mean_on_and_off():
    """`cuda_graphs: off` (or `dvc exp run -S train.cuda_graphs=off`) reaches us as False (YAML 1.1)."""
    assert parse_params({"train": {"cuda_graphs": False}}).train.cuda_graphs == "off"
    assert parse_params({"train": {"cuda_graphs": True}}).train.cuda_graphs == "on"
    with pytest.raises(ParamsError, match="train.amp"):
        parse_params({"train": {"amp": "yes"}})
