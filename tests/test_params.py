"""params.yaml validation: every kind of mistake stops with exit code 2 and names key, value, choices."""

import importlib
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, run_stage, write_params

from cnnlens.config import REGISTRIES, load_params, merge, parse_params, registry_choices
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
        ({"saliency": {"quick": "fast"}}, ["saliency.quick", "'fast'", "true or false"]),
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
    assert p.saliency.quick is False and parse_params({"saliency": {"quick": True}}).saliency.quick is True


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


# ---------------------------------------------------------------------------------------------
# issue 20: values YAML can spell that the checks above let through, and files that are not params


def params_text(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def load_error(tmp_path, text: str) -> str:
    """The ParamsError line load_params gives for a params file holding `text`."""
    with pytest.raises(ParamsError) as err:
        load_params(params_text(tmp_path, text))
    line = str(err.value)
    assert "\n" not in line, line
    return line


def float_keys(cls=None, prefix=""):
    """Every float param's dotted key, from the dataclasses."""
    import dataclasses
    import typing

    from cnnlens.config import Params

    cls = cls or Params
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from float_keys(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] is float:
            yield prefix + f.name


@pytest.mark.parametrize("spelling", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", sorted(float_keys()))
def test_every_float_param_must_be_finite(tmp_path, key, spelling):
    section, _, name = key.rpartition(".")
    nested = f"{section.replace('.', ': {')}: {{{name}: {spelling}}}" + "}" * section.count(".")
    line = load_error(tmp_path, nested + "\n")
    assert key in line and "finite" in line, line


def test_the_float_keys_of_the_issue_are_all_covered():
    assert {
        "train.lr",
        "train.momentum",
        "train.weight_decay",
        "train.label_smoothing",
        "prepare.max_aspect",
        "prepare.val_fraction",
        "saliency.smoothgrad_sigma",
        "data.timeout",
    } <= set(float_keys())


def test_config_check_refuses_nan_with_one_line(tmp_path):
    proc = run_stage("cnnlens.config", "check", params_text(tmp_path, "train: {lr: .nan}\n"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "train.lr" in proc.stderr, proc.stderr


@pytest.mark.parametrize("section", ["saliency", "activations"])
@pytest.mark.parametrize(
    "items, shown",
    [([1, 2], "1"), ([{"a": 1}], "{'a': 1}"), (["ok.jpg", None], "None"), ([["x"]], "['x']")],
)
def test_list_items_must_have_the_declared_type(section, items, shown):
    with pytest.raises(ParamsError) as err:
        parse_params({section: {"images": items}})
    line = str(err.value)
    assert f"{section}.images" in line and shown in line and "string" in line, line


@pytest.mark.parametrize("items", [[1], [{"a": 1}], [["gradient"]]])
def test_choice_lists_check_the_item_type_first(items):
    with pytest.raises(ParamsError, match=r"saliency\.methods"):
        parse_params({"saliency": {"methods": items}})


def test_every_list_param_declares_its_item_type():
    import dataclasses
    import typing

    from cnnlens.config import Params

    def lists(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from lists(hints[f.name])
            elif hints[f.name] is list or typing.get_origin(hints[f.name]) is list:
                yield f.name, hints[f.name]

    found = dict(lists(Params))
    assert {"images", "methods", "layers"} <= set(found)
    for name, hint in found.items():
        assert typing.get_args(hint), f"{name}: {hint} names no item type"


def alias_bomb(levels: int, width: int = 10) -> str:
    """model.weights as nested anchors that expand to width**(levels - 1) strings (billion laughs)."""
    lines = ['    - &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "model:\n  weights:\n" + "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_in_one_short_line(tmp_path):
    line = load_error(tmp_path, alias_bomb(5))  # 10**4 strings once expanded
    assert "anchor" in line and "line 3" in line and len(line) < 400, line[:1000]


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    import time

    path = params_text(tmp_path, alias_bomb(9))  # 10**8 strings once expanded
    start = time.monotonic()
    proc = run_stage("cnnlens.config", "check", path, timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2 and len(proc.stderr) < 400 and "anchor" in proc.stderr, proc.stderr[:1000]


def test_values_shown_in_errors_are_cut_short(tmp_path):
    huge = ["x" * 100] * 1000
    for raw in (
        {"model": {"weights": huge}},
        {"saliency": {"methods": huge}},
        {"train": huge},
        {"train": {"x" * 100_000: 1}},
    ):
        with pytest.raises(ParamsError) as err:
            parse_params(raw)
        assert len(str(err.value)) < 600, str(err.value)[:1000]


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    line = load_error(tmp_path, "seed: 0\ntrain:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n")
    assert "duplicate key train.epochs" in line and "line 3" in line and "line 5" in line, line
    line = load_error(tmp_path, "train: {epochs: 1}\nseed: 0\ntrain: {lr: 0.1}\n")
    assert "duplicate key train" in line and "line 1" in line and "line 3" in line, line


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    line = load_error(tmp_path, "train:\n  epochs: 1\n   lr: [0.1\n")
    assert str(tmp_path / "params.yaml") in line and "line 3" in line and "column" in line, line


@pytest.mark.parametrize(
    "text, words",
    [
        ("- train\n- seed\n", ["top level", "mapping", "list"]),
        ("just words\n", ["top level", "mapping"]),
        ("a: 1\n---\nb: 2\n", ["line 2", "single document"]),
        ("\x00\x01", ["params.yaml", "character"]),
        ("[" * 100_000, ["nested"]),
        ("train: {lr: 1" + "0" * 400 + "}\n", ["train.lr", "finite"]),
    ],
)
def test_a_file_that_is_not_params_is_one_line(tmp_path, text, words):
    line = load_error(tmp_path, text)
    for word in words:
        assert word in line, line


def test_a_folder_or_missing_file_as_params_is_one_line(tmp_path):
    for path in (tmp_path, tmp_path / "nope.yaml"):
        with pytest.raises(ParamsError, match=str(path)):
            load_params(path)


def one_line(proc, *words):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr


def test_merge_cli_bad_files_are_one_line(tmp_path):
    good = ROOT / "params.yaml"
    missing = tmp_path / "missing.yaml"
    one_line(run_stage("cnnlens.config", "merge", good, missing), str(missing), "not found")
    one_line(run_stage("cnnlens.config", "merge", missing, good), str(missing), "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    one_line(run_stage("cnnlens.config", "merge", good, bad), str(bad), "line", "column")
    bad.write_text("- 1\n- 2\n")
    one_line(run_stage("cnnlens.config", "merge", good, bad), str(bad), "mapping")
    bad.write_text("train: {epochs: 1, epochs: 2}\n")
    one_line(run_stage("cnnlens.config", "merge", good, bad), str(bad), "duplicate key train.epochs")


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_registry_choices_read_from_source_equal_the_imported_registry(name):
    module, attr = REGISTRIES[name]
    assert registry_choices(name) == tuple(getattr(importlib.import_module(module), attr))


def test_validating_params_imports_no_torch():
    """download and prepare never import torch: checking model.arch or saliency.methods must not either."""
    code = (
        "import sys; from cnnlens.config import load_params; load_params('params.yaml');"
        "import stages.download, stages.prepare;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'}))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
