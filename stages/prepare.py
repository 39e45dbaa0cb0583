"""prepare: raw ImageFolder -> packed uint8 shards, manifest, classes.json (and a resized ImageFolder copy).

python -m stages.prepare --raw data/raw --out data/prepared --report metrics/data.json
Training then memory-maps data/prepared/shards/ (cnnlens/shards.py) and never decodes a JPEG per epoch.
Images stream through a bounded decode pipeline into shards of at most prepare.shard_mb each, so
memory does not grow with the number of images; prepare.copy_images: false skips the resized copy
(one file per image for DVC to hash) for large data.
"""

import collections
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.decode import (
    BadImage,
    center_square,
    decode_rgb,
    resize_short_side,
    scan_imagefolder,
    stratified_split,
    to_chw_uint8,
)
from cnnlens.errors import StageError
from cnnlens.files import atomic_outputs, sha256_file, write_json
from cnnlens.shards import ShardWriter, write_index

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


def bounded_map(fn, items: list, workers: int, depth: int):
    """fn over items on a thread pool, results in order, at most `depth` submitted and not yet taken:
    memory holds a few decoded images, however many there are."""
    pool = ThreadPoolExecutor(workers)  # PIL releases the GIL while decoding and resizing
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # a stop (SIGTERM from a dying dvc, Ctrl-C) must not wait for every queued image
        pool.shutdown(cancel_futures=True)


def decode_stream(raw: Path, splits: dict, classes: list[str], p):
    """Decode, resize and pack every image: yields (job, result or None, name or skip reason) in order."""
    masks = read_annotations(raw)
    jobs = [(split, cls, f) for split in ("train", "val") for cls in classes for f in splits[split][cls]]
    names = check_names(raw, jobs)

    def work(job):
        split, cls, f = job
        try:
            return job, process(raw, f, masks.get(f.relative_to(raw).as_posix()), p.prepare), names[job]
        except BadImage as exc:
            return job, None, str(exc)

    workers = min(32, (os.cpu_count() or 1) + 4)
    results = bounded_map(work, jobs, workers, depth=4 * workers)
    yield from tqdm(results, total=len(jobs), desc="prepare", unit="img", leave=False, disable=None)


def write_prepared(out: Path, results, classes: list[str], pp) -> tuple[list[dict], list]:
    """Streams the results into the shards (and, with prepare.copy_images, the resized ImageFolder
    copy); returns the manifest rows and the results that were skipped."""
    shards = out / "shards"
    shards.mkdir(parents=True)
    writers = {s: ShardWriter(shards, s, pp.resize, pp.shard_mb * 2**20) for s in ("train", "val")}
    rows, bad = [], []
    for (split, cls, f), res, name in results:
        if res is None:
            bad.append(((split, cls, f), res, name))
            continue
        record, jpeg, square, mask = res
        if pp.copy_images:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(jpeg)
        prepared = name if pp.copy_images else ""
        rows.append(
            {**record, "prepared": prepared, "split": split, "class": cls, "label": classes.index(cls)}
        )
        writers[split].add(square, mask, classes.index(cls), record["path"])
    write_index(shards, pp.resize, {s: w.close() for s, w in writers.items()})
    return rows, bad


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
    # all or nothing, the report last: a failed stage never leaves fresh metrics beside stale outs
    with atomic_outputs(args.out, args.report) as (out, report_tmp):
        rows, bad = write_prepared(out, decode_stream(args.raw, splits, classes, p), classes, p.prepare)
        skipped = skipped_images(args.raw, bad, p.prepare.on_bad_image)
        counts = {
            s: {c: sum(r["split"] == s and r["class"] == c for r in rows) for c in classes}
            for s in ("train", "val")
        }
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
        pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
        (out / "classes.json").write_text(json.dumps(classes) + "\n")
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
