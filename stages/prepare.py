"""prepare: raw ImageFolder -> resized ImageFolder, manifest, classes.json and packed uint8 tensors.

python -m stages.prepare --raw data/raw --out data/prepared --report metrics/data.json
Training then reads `train.pt` / `val.pt` and never decodes a JPEG per epoch.
"""

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from cnnlens.cli import StageError, log, run_main, stage_args
from cnnlens.decode import (
    BadImage,
    center_square,
    decode_rgb,
    resize_short_side,
    scan_imagefolder,
    stratified_split,
    to_chw_uint8,
)
from cnnlens.files import atomic_outputs, save_torch, sha256_file, write_json

# JPEG stores at most 65,535 px a side; anything the resize makes larger cannot be a prepared image
JPEG_MAX_SIDE = 65_535


def process(raw: Path, path: Path, mask_path: Path | None, pp):
    """Decode one file; returns the record, the resized image as JPEG bytes, the packed square (and its mask).

    An image the pipeline cannot store or use (an aspect ratio over prepare.max_aspect, a resized
    side over JPEG's limit, a failed encode) is a BadImage: skipped or fatal by prepare.on_bad_image."""
    side = pp.resize
    img, (w, h) = decode_rgb(path, pp.max_pixels, draft_size=side)
    ratio = max(img.size) / min(img.size)
    if ratio > pp.max_aspect:
        raise BadImage(f"aspect ratio {ratio:.0f}:1 ({w}x{h}) exceeds prepare.max_aspect={pp.max_aspect:g}")
    resized = resize_short_side(img, side)
    if max(resized.size) > JPEG_MAX_SIDE:
        raise BadImage(
            f"resized to {resized.size[0]}x{resized.size[1]}: over JPEG's {JPEG_MAX_SIDE} px a side"
        )
    encoded = io.BytesIO()
    try:
        resized.save(encoded, format="JPEG", quality=95)
    except (OSError, ValueError) as exc:
        raise BadImage(
            f"cannot encode the resized {resized.size[0]}x{resized.size[1]} image as JPEG: {exc}"
        ) from None
    square = to_chw_uint8(center_square(resized))
    mask = None
    if mask_path is not None:
        m = Image.open(mask_path).convert("L").resize(img.size, Image.NEAREST)
        mask = (np.asarray(center_square(resize_short_side(m, side, Image.NEAREST))) > 127).astype(np.uint8)
    record = {
        "path": path.relative_to(raw).as_posix(),
        "orig_width": w,
        "orig_height": h,
        "sha256": sha256_file(path),
        "box": box_of(mask),
    }
    return record, encoded.getvalue(), square, mask


def prepared_name(raw: Path, split: str, cls: str, path: Path) -> str:
    """<split>/<class>/<path inside the class folder>, plus .jpg unless it already ends so: distinct
    sources (img.bmp, img.png, sub/img.jpg) stay distinct prepared files."""
    inside = "/".join(path.relative_to(raw).parts[2:])
    return f"{split}/{cls}/{inside}" + ("" if inside.endswith(".jpg") else ".jpg")


def check_names(raw: Path, jobs: list) -> dict:
    """{job: prepared name}; two sources that would still share a name are refused, both named."""
    names, owner = {}, {}
    for job in jobs:
        name = prepared_name(raw, *job)
        if name in owner:
            first, second = (j[2].relative_to(raw).as_posix() for j in (owner[name], job))
            raise StageError(f"{raw}: {first} and {second} would both become {name}; rename one of them")
        owner[name], names[job] = job, name
    return names


def box_of(mask) -> str:
    if mask is None or not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    return f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"


def decode_all(raw: Path, splits: dict, classes: list[str], p) -> list:
    """Decode, resize and pack every image on a thread pool: [(job, result or None, name or skip reason)]."""
    masks = read_annotations(raw)
    jobs = [(split, cls, f) for split in ("train", "val") for cls in classes for f in splits[split][cls]]
    names = check_names(raw, jobs)

    def work(job):
        split, cls, f = job
        try:
            return job, process(raw, f, masks.get(f.relative_to(raw).as_posix()), p.prepare), names[job]
        except BadImage as exc:
            return job, None, str(exc)

    pool = ThreadPoolExecutor()  # PIL releases the GIL while decoding and resizing
    try:
        return list(
            tqdm(pool.map(work, jobs), total=len(jobs), desc="prepare", unit="img", leave=False, disable=None)
        )
    finally:  # a stop (SIGTERM from a dying dvc, Ctrl-C) must not wait for every queued image
        pool.shutdown(cancel_futures=True)


def write_prepared(out: Path, results: list, classes: list[str]) -> list[dict]:
    """The resized ImageFolder copy, the packed tensors, manifest.csv and classes.json; returns the rows."""
    rows, packs = [], {s: {"images": [], "labels": [], "paths": [], "masks": []} for s in ("train", "val")}
    for (split, cls, _), res, name in results:
        if res is None:
            continue
        record, jpeg, square, mask = res
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(jpeg)
        rows.append({**record, "prepared": name, "split": split, "class": cls, "label": classes.index(cls)})
        pack = packs[split]
        pack["images"].append(square)
        pack["labels"].append(classes.index(cls))
        pack["paths"].append(record["path"])
        pack["masks"].append(mask)
    for split, pack in packs.items():
        tensors = {
            "images": torch.from_numpy(np.stack(pack["images"])),
            "labels": torch.tensor(pack["labels"], dtype=torch.int64),
            "paths": pack["paths"],
        }
        if all(m is not None for m in pack["masks"]):
            tensors["masks"] = torch.from_numpy(np.stack(pack["masks"]))
        save_torch(tensors, out / f"{split}.pt")
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "classes.json").write_text(json.dumps(classes) + "\n")
    return rows


def main(argv=None):
    args, p = stage_args(__doc__, ("--raw", "--out", "--report"), argv, outs=("--out", "--report"))
    if not (args.raw / "train").is_dir():
        raise StageError(
            f"{args.raw}: no train/ folder; expected an ImageFolder tree {args.raw}/train/<class>/<image> "
            "(run `dvc repro download_data` or check data.source)"
        )
    splits = scan_imagefolder(args.raw)
    if "val" not in splits:
        splits = stratified_split(splits["train"], p.prepare.val_fraction, p.seed)
        log(f"prepare: no val/ folder, split train by val_fraction={p.prepare.val_fraction} (seed {p.seed})")
    classes = sorted(set(splits["train"]) | set(splits["val"]))
    check_classes(splits, classes, args.raw)
    results = decode_all(args.raw, splits, classes, p)
    skipped = skipped_images(args.raw, results, p.prepare.on_bad_image)
    kept = [job for job, res, _ in results if res is not None]
    counts = {s: {c: sum(j[0] == s and j[1] == c for j in kept) for c in classes} for s in ("train", "val")}
    check_classes(
        {s: {c: [0] * n for c, n in cc.items()} for s, cc in counts.items()},
        classes,
        args.raw,
        after="after skipping bad images",
    )
    report = {
        "classes": len(classes),
        "train_images": sum(counts["train"].values()),
        "val_images": sum(counts["val"].values()),
        "skipped": len(skipped),
        "per_class": counts,
        "skipped_files": skipped,
    }
    # all or nothing, the report last: a failed stage never leaves fresh metrics beside stale outs
    with atomic_outputs(args.out, args.report) as (out, report_tmp):
        write_prepared(out, results, classes)
        pd.DataFrame(skipped, columns=["path", "split", "class", "reason"]).to_csv(
            out / "skipped.csv", index=False
        )
        write_json(report_tmp, report)
    log(
        f"prepare: {report['train_images']} train / {report['val_images']} val images, {len(classes)} classes, "
        f"{len(skipped)} skipped" + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped)
    )


def skipped_images(raw: Path, results: list, policy: str) -> list[dict]:
    """The report's rows for the files that are not prepared; with on_bad_image=fail, an error."""
    skipped = [
        {"path": f.relative_to(raw).as_posix(), "split": s, "class": c, "reason": why}
        for (s, c, f), res, why in results
        if res is None
    ]
    if skipped and policy == "fail":
        lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
        raise StageError(
            f"{len(skipped)} bad image(s) in {raw} and prepare.on_bad_image=fail:\n{lines}\n"
            "remove or fix them, or set prepare.on_bad_image: skip"
        )
    return skipped


def check_classes(splits, classes, raw, after=""):
    where = f" {after}" if after else ""
    if len(classes) < 2:
        raise StageError(
            f"{raw}: found {len(classes)} class folder(s) ({', '.join(classes) or 'none'}){where}; "
            "an ImageFolder needs at least 2 (train/<class>/...)"
        )
    for split in ("train", "val"):
        for cls in classes:
            if cls not in splits[split]:
                raise StageError(
                    f"{raw}: class '{cls}' is missing from {split}/; every class must be in both splits"
                )
            if not splits[split][cls]:
                raise StageError(
                    f"{raw}/{split}/{cls}: no images{where}; add images or remove the class folder"
                )


def read_annotations(raw: Path) -> dict[str, Path]:
    """{image path: mask file} from the synthetic source's annotations.csv, if there is one."""
    csv = raw / "annotations.csv"
    if not csv.exists():
        return {}
    table = pd.read_csv(csv)
    return {row.path: raw / row.mask for row in table.itertuples() if isinstance(row.mask, str)}


if __name__ == "__main__":
    run_main(main)
