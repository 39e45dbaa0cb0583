"""Params reads cannot drift from dvc.yaml: every params key a stage reads is in its `params:` list.

Each stage's command from dvc.yaml runs in-process, in order, on a tiny synthetic project, with a
Params object that records every field read (a section listed in dvc.yaml covers all its keys). A
read that dvc.yaml does not declare means an edit to that key would leave the stage's outputs stale
while `dvc status` says up to date.
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex

import pytest
import yaml
from conftest import ROOT, write_params
from dvc_helpers import TINY

import cnnlens.config


def recording(obj, reads: set[str], prefix: str = ""):
    """A copy of a frozen params dataclass whose every leaf field read adds its dotted key to `reads`.
    A subclass, not a proxy: dataclasses.asdict and isinstance see a real dataclass (and asdict reads
    every field, which counts)."""
    names = {f.name for f in dataclasses.fields(obj)}

    class Recording(type(obj)):
        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if name in names and not dataclasses.is_dataclass(value):
                reads.add(prefix + name)
            return value

    values = {
        name: recording(value, reads, f"{prefix}{name}.") if dataclasses.is_dataclass(value) else value
        for name in names
        for value in [object.__getattribute__(obj, name)]
    }
    return Recording(**values)


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_recording_counts_leaf_reads_and_asdict():
    reads: set[str] = set()
    p = recording(cnnlens.config.Params(), reads)
    assert p.train.loss == "cross_entropy" and p.seed == 0
    assert reads == {"train.loss", "seed"}
    cnnlens.config.to_dict(p.data)
    assert {"data.source", "data.synthetic.image_size"} <= reads
    assert covered("data.synthetic.image_size", ["data"]) and not covered("train.device", ["evaluate"])
    assert not covered("model.weights", ["model.arch"]) and not covered("models", ["model"])


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory, one_thread):
    """{dvc.yaml stage: the params keys its run read}, the whole pipeline run once on TINY params."""
    work = tmp_path_factory.mktemp("reads")
    params = write_params(work / "params.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}})
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    load = cnnlens.config.load_params
    reads: dict[str, set[str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for name, stage in stages.items():
            argv = shlex.split(stage["cmd"])
            assert argv[:2] == ["python", "-m"], stage["cmd"]
            module = importlib.import_module(argv[2])
            seen = reads.setdefault(name, set())
            fake = lambda path="params.yaml", seen=seen: recording(load(path), seen)
            mp.setattr(cnnlens.config, "load_params", fake)  # what cnnlens.config.stage_args calls
            if hasattr(module, "load_params"):  # download imports it by name
                mp.setattr(module, "load_params", fake)
            module.main([*argv[3:], "--params", str(params)])
            # a stage that declares no params (export) reads none
            assert seen or not stage.get("params"), (
                f"stage {name} read no params at all: is the recorder installed?"
            )
    return reads


def test_every_params_read_is_declared_in_dvc_yaml(stage_reads):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    undeclared = {
        name: sorted(k for k in keys if not covered(k, stages[name].get("params", [])))
        for name, keys in stage_reads.items()
    }
    assert not any(undeclared.values()), "dvc.yaml params lists miss keys the stages read: " + "; ".join(
        f"{n}: {', '.join(k)}" for n, k in undeclared.items() if k
    )


def test_each_stage_reads_its_own_section(stage_reads):
    """A stage's keys live in its own section (a device setting belongs to the stage that uses it);
    the shared ones are seed, model.arch, and data.timeout/retries for the downloads."""
    own = {
        "download_data": ["seed", "data"],
        "download_weights": ["model", "data.timeout", "data.retries"],
        "prepare": ["seed", "prepare"],
        "finetune": ["seed", "model.arch", "train"],
        "evaluate": ["evaluate"],
        "saliency": ["seed", "saliency"],
        "activations": ["activations"],
        "export": [],
    }
    assert set(stage_reads) == set(own)
    foreign = {n: sorted(k for k in keys if not covered(k, own[n])) for n, keys in stage_reads.items()}
    assert not any(foreign.values()), foreign


def test_declared_params_exist():
    """Every dvc.yaml params entry names a real key or section of params.yaml (no stale names)."""
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        for entry in stage.get("params", []):
            node = written
            for part in entry.split("."):
                assert isinstance(node, dict) and part in node, f"dvc.yaml {name}: no params key {entry}"
                node = node[part]
