"""Stages download_data and download_weights: get the raw images and the pretrained weights.

    python -m stages.download data --out data/raw [--params params.yaml]
    python -m stages.download weights --out data/weights [--params params.yaml]

data (params data.*): `source` is one of
  hymenoptera     the PyTorch tutorial's ants/bees zip (size checked; hash pinned by data.sha256)
  synthetic       generated ants/bees-like images with object masks (cnnlens/synthetic.py), offline
  http(s)://...   any zip holding an ImageFolder (verified against data.sha256 when set)
  path/to.zip     a local zip, hashed (and verified against data.sha256 when set)
  path/to/dir     a local ImageFolder directory (train/<class>/<image>), copied
and the result is data/raw/{train,val}/<class>/<image> plus data/raw/SOURCE.json (cnnlens/sources.py).

weights (params model.*): `weights` is IMAGENET1K_V1 (torchvision's file for model.arch, always
verified), none (random init; only weights.json is written) or a path to a state_dict file.
The output folder holds weights.pth (when any) and weights.json {source, url, arch, bytes, sha256}.
Nothing is loaded here: the finetune stage loads weights.pth with weights_only=True.

Both outputs are written to a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.fetch import WEIGHTS_HINT, download
from cnnlens.files import atomic_path, write_json
from cnnlens.sources import write_imagefolder
from cnnlens.weights import copy_local_weights, imagenet_source

WHAT = ("data", "weights")


def split_what(argv: list[str] | None) -> tuple[str | None, list[str]]:
    """The positional data|weights (first) and the flags stage_args reads; -h alone shows the help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in WHAT:
        return argv[0], argv[1:]
    if not {"-h", "--help"} & set(argv):
        usage = "python -m stages.download {data,weights} --out OUT [--params PARAMS]"
        argparse.ArgumentParser(prog="python -m stages.download", usage=usage).error(
            f"the first argument must be one of: {', '.join(WHAT)}"
        )
    return None, argv


def get_data(params, out: Path) -> None:
    """data/raw from data.source (cnnlens/sources.py), with SOURCE.json."""
    d = params.data
    write_imagefolder(
        out,
        d.source,
        sha256=d.sha256,
        timeout=d.timeout,
        retries=d.retries,
        max_extract_mb=d.max_extract_mb,
        symlinks=d.symlinks,
        seed=params.seed,
        synthetic=dataclasses.asdict(d.synthetic),
    )


def get_weights(params, out: Path) -> None:
    """weights.pth (none for model.weights: none) and weights.json in `out`."""
    arch, choice = params.model.arch, params.model.weights
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if choice == "none":
            info = {"source": "none", "url": None, "arch": arch, "bytes": None, "sha256": None}
        elif choice == "IMAGENET1K_V1":
            url, size, sha = imagenet_source(arch)
            got = download(
                url,
                tmp / "weights.pth",
                expected_size=size,
                expected_sha256=sha,
                timeout=params.data.timeout,
                retries=params.data.retries,
                desc=f"{arch} weights",
                hint=WEIGHTS_HINT,
            )
            info = {
                "source": choice,
                "url": url,
                "arch": arch,
                "bytes": got["bytes"],
                "sha256": got["sha256"],
            }
        else:
            info = copy_local_weights(Path(choice), arch, tmp / "weights.pth")
        write_json(tmp / "weights.json", info)
    what = (
        "no weights (random init)"
        if info["source"] == "none"
        else f"{info['bytes']} bytes, sha256 {info['sha256']}"
    )
    log(f"{out}: {arch} {choice}: {what}")


def main(argv=None):
    what, rest = split_what(argv)
    args, params = stage_args(__doc__, ("--out",), argv=rest, outs=("--out",))
    if what == "data":
        get_data(params, args.out)
    else:
        get_weights(params, args.out)


if __name__ == "__main__":
    run_main(main)
