"""prepare: raw ImageFolder -> resized ImageFolder, manifest, classes.json and packed uint8 tensors.

python -m stages.prepare --raw data/raw --out data/prepared --report metrics/data.json
Training then reads `train.pt` / `val.pt` and never decodes a JPEG per epoch.
"""

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
from cnnlens.files import atomic_path, sha256_file, write_json


def process(raw: Path, path: Path, mask_path: Path | None, side: int, max_pixels: int):
    """Decode one file; returns the record, the resized image, the packed square (and its mask)."""
    img, (w, h) = decode_rgb(path, max_pixels, draft_size=side)
    resized = resize_short_side(img, side)
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
    return record, resized, square, mask


def box_of(mask) -> str:
    if mask is None or not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    return f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"


def decode_all(raw: Path, splits: dict, classes: list[str], p) -> list:
    """Decode, resize and pack every image on a thread pool: [(job, result or None, reason or None)]."""
    masks = read_annotations(raw)
    jobs = [(split, cls, f) for split in ("train", "val") for cls in classes for f in splits[split][cls]]

    def work(job):
        split, cls, f = job
        try:
            return (
                job,
                process(
                    raw, f, masks.get(f.relative_to(raw).as_posix()), p.prepare.resize, p.prepare.max_pixels
                ),
                None,
            )
        except BadImage as exc:
            return job, None, str(exc)

    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding and resizing
        return list(
            tqdm(pool.map(work, jobs), total=len(jobs), desc="prepare", unit="img", leave=False, disable=None)
        )


def write_prepared(out: Path, results: list, classes: list[str]) -> list[dict]:
    """The resized ImageFolder copy, the packed tensors, manifest.csv and classes.json; returns the rows."""
    rows, packs = [], {s: {"images": [], "labels": [], "paths": [], "masks": []} for s in ("train", "val")}
    for (split, cls, f), res, _ in results:
        if res is None:
            continue
        record, resized, square, mask = res
        name = f"{split}/{cls}/{f.stem}.jpg"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        resized.save(out / name, quality=95)
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
        torch.save(tensors, out / f"{split}.pt")
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "classes.json").write_text(json.dumps(classes) + "\n")
    return rows


def main(argv=None):
    args, p = stage_args(__doc__, ("--raw", "--out", "--report"), argv)
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
    skipped = [
        {"path": f.relative_to(args.raw).as_posix(), "split": s, "class": c, "reason": why}
        for (s, c, f), _, why in results
        if why
    ]
    if skipped and p.prepare.on_bad_image == "fail":
        lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
        raise StageError(
            f"{len(skipped)} bad image(s) in {args.raw} and prepare.on_bad_image=fail:\n{lines}\n"
            "remove or fix them, or set prepare.on_bad_image: skip"
        )
    kept = [job for job, res, _ in results if res is not None]
    counts = {s: {c: sum(j[0] == s and j[1] == c for j in kept) for c in classes} for s in ("train", "val")}
    check_classes(
        {s: {c: [0] * n for c, n in cc.items()} for s, cc in counts.items()},
        classes,
        args.raw,
        after="after skipping bad images",
    )
    with atomic_path(args.out) as out:
        write_prepared(out, results, classes)
        pd.DataFrame(skipped, columns=["path", "split", "class", "reason"]).to_csv(
            out / "skipped.csv", index=False
        )
    report = {
        "classes": len(classes),
        "train_images": sum(counts["train"].values()),
        "val_images": sum(counts["val"].values()),
        "skipped": len(skipped),
        "per_class": counts,
        "skipped_files": skipped,
    }
    write_json(args.report, report)  # last: a failed stage never leaves fresh metrics beside stale outs
    log(
        f"prepare: {report['train_images']} train / {report['val_images']} val images, {len(classes)} classes, "
        f"{len(skipped)} skipped" + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped)
    )


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
