"""params.yaml, loaded once into typed, validated dataclasses.

Each section of params.yaml is one dataclass below; each field's metadata says what is allowed.
A wrong type (a list item too, a float that is NaN or infinite), a value out of range, an unknown
choice or an unknown key (a typo) raises ParamsError (exit code 2) naming the key, the bad value
(cut short) and what is allowed. The file itself is read by a strict YAML loader: a syntax error
(line, column), a duplicate key (both lines, as DVC refuses it) or an anchor/alias (a few lines of
them can expand to gigabytes) is one ParamsError line too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnnlens.devices import DEVICES
from cnnlens.errors import ParamsError

# Choices that a library registry owns: field metadata names the registry, _check reads it. Read from
# the module's source (a dict literal's keys), not by importing it: the registries live beside torch
# code, and importing torch (over a second) only to check a name would cost every torch-free stage
# (download, prepare) that much. Nor are they imported when this module is, so that a stage's code deps
# (dvc.yaml) stay the modules its results come from: a new saliency method must not rerun download.
REGISTRIES = {
    "archs": ("cnnlens.model", "ARCHS"),
    "losses": ("cnnlens.losses", "LOSSES"),
    "methods": ("cnnlens.attribution", "METHODS"),
    "layers": ("cnnlens.hooks", "RESNET_LAYERS"),
}


@functools.cache
def registry_choices(name: str) -> tuple[str, ...]:
    """The keys of the registry `name`, in order, from its module's source (tests check they equal the
    imported dict's)."""
    module, attr = REGISTRIES[name]
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == attr for t in node.targets):
            return tuple(ast.literal_eval(key) for key in node.value.keys)
    raise LookupError(f"{module}.{attr}: no top-level dict literal")


def param(default, *, choices=None, min=None, max=None, doc="", words=()):
    """A field with validation metadata. Lists/dicts get a default_factory. `words`: strings allowed
    besides the field's type (e.g. `auto` for a number)."""
    meta = {"choices": choices, "min": min, "max": max, "doc": doc, "words": words}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SyntheticParams:
    image_size: int = param(256, min=32, max=2048, doc="side of the generated square images")
    train_ants: int = param(123, min=1)
    train_bees: int = param(121, min=1)
    val_ants: int = param(70, min=1)
    val_bees: int = param(83, min=1)


@dataclass(frozen=True)
class DataParams:
    source: str = param(
        "hymenoptera", doc="hymenoptera | synthetic | http(s) URL | local .zip | local ImageFolder dir"
    )
    sha256: str | None = param(None, doc="expected SHA-256 of a downloaded or local archive; null: record it")
    timeout: float = param(30.0, min=1.0, doc="connect/read timeout in seconds")
    retries: int = param(3, min=0, max=10)
    max_extract_mb: int = param(2048, min=1, doc="refuse archives that unpack to more than this")
    symlinks: str = param(
        "inside",
        choices=("inside", "refuse", "follow"),
        doc="links in a local ImageFolder dir: inside = copy those whose target is in the folder, "
        "refuse = none, follow = any target; a dangling link or one file in two split/class folders "
        "is always refused",
    )
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass(frozen=True)
class ModelParams:
    arch: str = param("resnet18", choices="archs")
    weights: str = param("IMAGENET1K_V1", doc="IMAGENET1K_V1 | none | path to a state_dict file")


@dataclass(frozen=True)
class PrepareParams:
    resize: int = param(
        256, min=16, max=4096, doc="short side of the prepared images (and packed square side)"
    )
    val_fraction: float = param(0.2, min=0.01, max=0.9, doc="used only when the raw data has no val/ folder")
    on_bad_image: str = param("skip", choices=("skip", "fail"))
    max_pixels: int = param(89_478_485, min=1, doc="larger images are treated as decompression bombs")
    max_aspect: float = param(
        20.0, min=1.0, max=1000.0, doc="images longer than this times their short side are bad"
    )
    shard_mb: int = param(256, min=1, max=4096, doc="most MiB of packed images per shard file")
    copy_images: bool = param(True, doc="also write the resized ImageFolder copy; false for large data")


@dataclass(frozen=True)
class TrainParams:
    mode: str = param("finetune", choices=("finetune", "feature_extractor"))
    loss: str = param("cross_entropy", choices="losses")
    label_smoothing: float = param(0.0, min=0.0, max=0.99)
    focal_gamma: float = param(2.0, min=0.0, max=10.0)
    epochs: int = param(25, min=1, max=10_000)
    batch_size: int = param(4, min=1, max=4096)
    lr: float = param(0.001, min=0.0)
    momentum: float = param(0.9, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    step_size: int = param(7, min=1)
    gamma: float = param(0.1, min=0.0, max=1.0)
    crop: int = param(224, min=8, max=4096, doc="input size of the network")
    min_scale: float = param(0.08, min=0.01, max=1.0, doc="RandomResizedCrop scale lower bound")
    flip: bool = param(True)
    augment: bool = param(True, doc="false: train on the centre crop, no random crop or flip")
    device: str = param("auto", choices=DEVICES)
    amp: bool = param(True, doc="bf16 autocast and channels_last on CUDA")
    deterministic: bool = param(False, doc="CUDA determinism flags (slower)")
    cache_features: bool = param(
        False, doc="feature_extractor without augmentation: run the frozen backbone once"
    )
    compile: bool = param(False, doc="torch.compile the model (CUDA)")
    cuda_graphs: str = param(
        "off",
        choices=("auto", "on", "off"),
        doc="CUDA, experimental: the whole train step as one captured CUDA graph (not with compile or "
        "cache_features); auto: on, falling back to eager if capture fails; on: a failed capture is an error. "
        "Off by default until graphed training is shown equal to eager on a GPU (BENCHMARKS.md, GPU)",
    )
    threads: int = param(0, min=0, doc="CPU threads; 0: torch's default (per process: cores / processes)")
    # distributed data parallel (torch.distributed, launched by torchrun's elastic launcher)
    nproc_per_node: int | str = param(
        1, min=1, max=1024, words=("auto",), doc="processes on this machine; auto: one per visible GPU"
    )
    nnodes: int = param(1, min=1, max=1024, doc="machines taking part")
    node_rank: int = param(
        0, min=0, max=1023, doc="this machine's index, 0 .. nnodes - 1 (0 writes the outputs)"
    )
    rdzv_endpoint: str = param(
        "", doc="host:port of node 0's rendezvous (several nodes); empty: a free port here (one node)"
    )
    rdzv_timeout: int = param(
        300, min=1, doc="seconds a node waits for the others at rdzv_endpoint before it stops with an error"
    )
    backend: str = param("auto", choices=("auto", "nccl", "gloo"), doc="auto: NCCL on CUDA, gloo on CPU")
    sync_batchnorm: bool = param(False, doc="several processes: BatchNorm statistics over the global batch")
    resident_mb: int | str = param(
        "auto",
        min=0,
        words=("auto",),
        doc="keep the packed train+val images on the device when they take at most this many MiB, else "
        "stream batches from the memory-mapped shards; auto: half the free GPU memory, on a CPU always stream",
    )
    # early stopping, and training that survives interruption (docs/resume.md)
    patience: int = param(0, min=0, doc="stop after this many epochs without improvement of monitor; 0: off")
    min_delta: float = param(0.0, min=0.0, doc="the smallest change of monitor that counts as an improvement")
    monitor: str = param("val_acc", choices=("val_acc", "val_loss"), doc="what early stopping watches")
    resume: str = param(
        "auto",
        choices=("auto", "never"),
        doc="auto: resume from a checkpoint of the same inputs; never: start over",
    )
    checkpoint_every: float = param(
        60.0,
        min=0.0,
        doc="seconds of training between resumable checkpoints (more if a write takes over 2% of them); "
        "0: after every step",
    )
    max_restarts: int = param(
        0, min=0, max=100, doc="several processes: restart them all this many times when one fails"
    )


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: int = param(15, min=2, max=1000)
    gallery_max: int = param(32, min=0, doc="most misclassified images shown in the gallery")
    device: str = param("auto", choices=DEVICES)


@dataclass(frozen=True)
class SaliencyParams:
    num_images: int = param(8, min=1, max=10_000, doc="val images explained, chosen deterministically")
    images: list[str] = param([], doc="explicit manifest paths; overrides num_images when not empty")
    methods: list[str] = param(
        ["gradient", "smoothgrad", "integrated_gradients", "gradcam"], choices="methods"
    )
    normalize: str = param("minmax", choices=("minmax", "percentile"))
    percentile: float = param(99.0, min=50.0, max=100.0)
    smoothgrad_sigma: float = param(0.15, min=0.0, max=1.0, doc="noise std as a fraction of the input range")
    smoothgrad_samples: int = param(25, min=1, max=1000)
    ig_steps: int = param(32, min=2, max=1000)
    gradcam_layer: str = param(
        "auto",
        doc="the layer the CAM methods hook: auto (the deepest block whose map is at least 7 x 7 at the "
        "model's input size) or a module name such as layer3 (checked against the model when the stage runs)",
    )
    occlusion_window: int = param(32, min=1, max=4096, doc="occlusion's square window, px")
    occlusion_stride: int = param(16, min=1, max=4096, doc="occlusion's stride, px")
    gradshap_samples: int = param(16, min=1, max=1000, doc="GradientSHAP draws per image")
    quality_steps: int = param(16, min=2, max=1000, doc="deletion/insertion steps")
    road_steps: int = param(
        9, min=0, max=99, doc="ROAD: remove k / (road_steps + 1) of the pixels, k = 1..road_steps; 0: no ROAD"
    )
    quality_images: int = param(32, min=0, doc="val images scored for explanation quality; 0: all")
    bootstrap: int = param(1000, min=10, max=100_000)
    randomization: bool = param(True, doc="model-randomisation sanity check (Adebayo et al. 2018)")
    before_after: bool = param(True, doc="also explain the untuned network (downloaded weights, new head)")
    batch_size: int = param(16, min=1, max=4096)
    device: str = param("auto", choices=DEVICES)
    quick: bool = param(
        False,
        doc="true: the same maps and figures of the shown images, but quality scored on those images only "
        "(not quality_images), deletion/insertion at most 8 steps, no ROAD, no randomisation check; "
        "quality.json and the metrics say quick: true",
    )


@dataclass(frozen=True)
class ActivationsParams:
    images: list[str] = param([], doc="manifest paths; empty: the first num_images val images")
    num_images: int = param(2, min=1, max=1000)
    layers: list[str] = param(["stem", "layer1", "layer2", "layer3", "layer4"], choices="layers")
    max_maps: int = param(64, min=1, max=4096, doc="top-k maps by mean activation per grid")
    batch_size: int = param(32, min=1, max=4096)
    device: str = param("auto", choices=DEVICES)


@dataclass(frozen=True)
class Params:
    seed: int = param(0, min=0, max=2**31 - 1)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    saliency: SaliencyParams = field(default_factory=SaliencyParams)
    activations: ActivationsParams = field(default_factory=ActivationsParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = read_yaml(path, hint="run from the project root or pass --params")
    if raw is None:  # an empty file would silently mean "all defaults"
        raise ParamsError(
            f"{path}: is empty; expected the sections {', '.join(f.name for f in dataclasses.fields(Params))} "
            "(copy the project's params.yaml)"
        )
    return parse_params(raw, source=str(path))


# ---------------------------------------------------------------------------------------------
# reading the file: one ParamsError line for whatever keeps it from being a plain YAML mapping

MAX_SHOWN = 200  # characters of a bad value shown in an error line
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 120, 120
_SHORT.maxlong = 40


def shown(value) -> str:
    """repr(value) for an error line: nested and long values cut short, never more than MAX_SHOWN
    characters (repr of a 10**8-item list would be a 500 MB line)."""
    return _cut(_SHORT.repr(value))


def _cut(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _AnchorRefused(Exception):
    def __init__(self, event):
        super().__init__(event.anchor)
        self.sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
        self.anchor, self.mark = event.anchor, event.start_mark


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a dozen lines of nested aliases expand to
    10**9 values (a "billion laughs" file). DVC users rarely need them; the error says how to do without."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(event)
        return super().compose_node(parent, index)


def read_yaml(path: str | Path, hint: str = "check the path"):
    """The plain data (dicts, lists, scalars) of the YAML file at `path`, None if it is empty.
    A missing or unreadable file, a syntax error, an anchor or alias, or a duplicate key raises
    ParamsError: one line naming the file (and the line and column), and what to do."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; {hint}") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a folder, not a YAML file; {hint}") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read it ({exc.strerror}); check its permissions (ls -l)") from None
    loader = None
    try:
        loader = _ParamsLoader(data)  # reads the first bytes already: an error here is a YAMLError too
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML{_yaml_problem(exc)}; fix the file and rerun") from None
    except _AnchorRefused as exc:
        raise ParamsError(
            f"{path}: line {exc.mark.line + 1}, column {exc.mark.column + 1}: YAML anchors and aliases "
            f"(here {exc.sign}{_cut(exc.anchor)}) are not allowed in params files; write the value out"
        ) from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file; fix the file and rerun") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """` at line L, column C: what is wrong`, one line, cut short."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ", ".join(x for x in (exc.context, exc.problem) if x)
    elif isinstance(exc, yaml.reader.ReaderError) and exc.encoding == "unicode":  # a control character
        where, what = f" at character {exc.position + 1}", f"character #x{exc.character:04x}, {exc.reason}"
    elif isinstance(exc, yaml.reader.ReaderError):  # bytes that do not decode
        where, what = f" at byte {exc.position + 1}", f"not {exc.encoding} text ({exc.reason})"
    else:
        where, what = "", " ".join(str(exc).split())
    return f"{where}: {_cut(what)}"


def _refuse_duplicate_keys(root: yaml.Node, path: Path) -> None:
    """A key written twice in one mapping is an error, as in DVC (PyYAML alone keeps the last)."""
    todo = [(root, "")]
    while todo:
        node, prefix = todo.pop()
        if isinstance(node, yaml.SequenceNode):
            todo += [(item, f"{prefix.rstrip('.')}[{i}].") for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and (key.tag, name) in seen:
                first = seen[(key.tag, name)]
                raise ParamsError(
                    f"{path}: duplicate key {_cut(prefix + name)} (line {first.start_mark.line + 1} "
                    f"and line {key.start_mark.line + 1}); DVC refuses such a file: keep one of them"
                )
            seen.setdefault((key.tag, name), key)
            todo.append((value, f"{prefix}{name}."))


# ---------------------------------------------------------------------------------------------
# checking the values


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    return _build(Params, raw, prefix="", source=source)


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_WRONG = object()  # _coerce: the value has another type


def _kind(value) -> str:
    for cls, word in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string")):
        if isinstance(value, cls):
            return word
    return {list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _build(cls, raw, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{source}: {where} must be a mapping of keys (key: value lines), got a {_kind(raw)}: {shown(raw)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=str)
    if unknown:
        raise ParamsError(
            # a misspelt key is short: its cut leaves room for the allowed keys (train has 35)
            f"{source}: unknown key {_cut(prefix + str(unknown[0]), 100)}; allowed keys in {where}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".", source)
        else:
            values[name] = _check(key, value, hint=hint, meta=fields[name].metadata, source=source)
    return cls(**values)


def _check(key, value, *, hint, meta, source):
    def fail(expected):
        raise ParamsError(f"{source}: {key} = {shown(value)} is not allowed; expected {expected}")

    union = isinstance(hint, types.UnionType)
    optional = union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if union else hint
    words = meta.get("words", ())
    if isinstance(value, str) and value in words:
        return value
    if value is None:
        if optional:
            return None
        fail(f"a value of type {getattr(base, '__name__', base)}")
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if isinstance(choices, str):
        choices = registry_choices(choices)
    if typing.get_origin(base) is list:
        return _check_list(key, value, hint=base, choices=choices, source=source)
    got = _coerce(value, base, choices)
    if got is _WRONG:
        fail(_expected(base, choices=choices, words=words, lo=lo, hi=hi))
    if choices and got not in choices:
        fail(f"one of: {', '.join(choices)}")
    if lo is not None and got < lo or hi is not None and got > hi:
        fail("".join(f"{w} or " for w in words) + (_range(lo, hi).lstrip(", ") or "a value in range"))
    return got


def _coerce(value, base, choices):
    """`value` as a `base` (bool, int, float or str), or _WRONG if YAML gave another type."""
    if base is bool:
        return value if isinstance(value, bool) else _WRONG
    if base is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _WRONG
        try:
            value = float(value)
        except OverflowError:  # an integer with hundreds of digits
            return _WRONG
        return value if math.isfinite(value) else _WRONG  # .nan, .inf, -.inf
    if base is str:
        if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
            return "on" if value else "off"  # YAML 1.1 (PyYAML, DVC's -S) reads a bare on/off as a boolean
        return value if isinstance(value, str) else _WRONG
    raise TypeError(f"params of type {base} have no check; add one to cnnlens.config._coerce")


def _expected(base, *, choices, words, lo, hi) -> str:
    if base is str and choices:
        return f"a string, one of: {', '.join(choices)}"
    rng = _range(lo, hi) if base in (int, float) else ""
    return "".join(f"{w} or " for w in words) + _KINDS[base] + rng


def _check_list(key, value, *, hint, choices, source) -> list:
    """A list whose every item has the declared type (`list[str]`), each one of `choices` if given."""
    (item_type,) = typing.get_args(hint)
    allowed = f": {', '.join(choices)}" if choices else f" ({_KINDS[item_type]} each)"
    if not isinstance(value, list):
        raise ParamsError(f"{source}: {key} = {shown(value)} is not allowed; expected a list{allowed}")
    items = []
    for i, item in enumerate(value):
        got = _coerce(item, item_type, choices)
        if got is _WRONG:
            raise ParamsError(
                f"{source}: {key}[{i}] = {shown(item)} is not allowed; expected {_KINDS[item_type]}"
            )
        if choices and got not in choices:
            raise ParamsError(
                f"{source}: {key} contains unknown choice {shown(got)}; allowed: {', '.join(choices)}"
            )
        items.append(got)
    if len(set(items)) != len(items) and choices:
        raise ParamsError(f"{source}: {key} = {shown(value)} is not allowed; expected a list without repeats")
    return items


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f", between {lo} and {hi}"
    if lo is not None:
        return f", at least {lo}"
    if hi is not None:
        return f", at most {hi}"
    return ""


def to_dict(params) -> dict:
    return dataclasses.asdict(params)


def stage_args(doc: str, path_flags: tuple[str, ...], *, argv=None, outs: tuple[str, ...] = ()):
    """The command line every stage shares: its paths (from dvc.yaml) and --params. Returns (args, Params).

    The paths named in `outs` (flags) are locked for the life of the process (files.lock_outputs)."""
    import argparse

    from cnnlens.files import lock_outputs

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in path_flags:
        ap.add_argument(flag, type=Path, required=True)
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    lock_outputs(*(getattr(args, flag.lstrip("-").replace("-", "_")) for flag in outs))
    return args, params


def merge(base: dict, overrides: dict) -> dict:
    """Recursively apply `overrides` onto `base` (both plain dicts from YAML)."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _mapping(path) -> dict:
    """A YAML file for `merge`: a mapping (empty if the file is), else one ParamsError line."""
    raw = read_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{path}: top level must be a mapping of keys (key: value lines), got a {_kind(raw)}"
        )
    return raw


def _cli(argv=None) -> None:
    """`python -m cnnlens.config merge BASE OVERRIDES [-o OUT]`: write a validated merged params file
    (used by `make demo` and the tests); `python -m cnnlens.config check [FILE]`: validate only."""
    import argparse
    import sys

    from cnnlens.cli import run_main
    from cnnlens.files import write_text

    def main(argv):
        ap = argparse.ArgumentParser(prog="python -m cnnlens.config")
        sub = ap.add_subparsers(dest="cmd", required=True)
        m = sub.add_parser("merge")
        m.add_argument("base")
        m.add_argument("overrides")
        m.add_argument("-o", "--out")
        c = sub.add_parser("check")
        c.add_argument("file", nargs="?", default="params.yaml")
        args = ap.parse_args(argv)
        if args.cmd == "check":
            load_params(args.file)
            print(f"{args.file}: ok", file=sys.stderr)
            return
        merged = merge(_mapping(args.base), _mapping(args.overrides))
        parse_params(merged, source=f"{args.base} + {args.overrides}")
        text = yaml.safe_dump(merged, sort_keys=False)
        if args.out:
            write_text(args.out, text)
        else:
            sys.stdout.write(text)

    run_main(main, argv)


if __name__ == "__main__":
    _cli()
