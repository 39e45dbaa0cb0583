"""prepare: raw ImageFolder -> packed uint8 shards, manifest, classes.json (and a resized ImageFolder copy).

python -m stages.prepare --raw data/raw --out data/prepared --report metrics/data.json
Training then memory-maps data/prepared/shards/ (cnnlens/shards.py) and never decodes a JPEG per epoch.
Images stream through a bounded decode pipeline (cnnlens/decode.py) into shards of at most
prepare.shard_mb each, so memory does not grow with the number of images; prepare.copy_images: false
skips the resized copy (one file per image for DVC to hash) for large data.
"""

import json
from pathlib import Path

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.decode import decode_stream, scan_imagefolder, stratified_split
from cnnlens.errors import StageError
from cnnlens.files import atomic_outputs, write_csv, write_json
from cnnlens.packing import ShardWriter, write_index


def write_prepared(out: Path, results, classes: list[str], *, pp) -> tuple[list[dict], list]:
    """Streams the results into the shards (and, with prepare.copy_images, the resized ImageFolder
    copy); returns the manifest rows and the results that were skipped."""
    shards = out / "shards"
    shards.mkdir(parents=True)
    limit = pp.shard_mb * 2**20
    writers = {s: ShardWriter(shards, s, side=pp.resize, max_bytes=limit) for s in ("train", "val")}
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
        writers[split].add(square, mask=mask, label=classes.index(cls), path=record["path"])
    write_index(shards, pp.resize, {s: w.close() for s, w in writers.items()})
    return rows, bad


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


def skipped_lines(skipped: list[dict], listing: Path, shown: int = 20) -> str:
    """The first `shown` skipped files, one line each, then how many more and where all are listed."""
    lines = "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped[:shown])
    more = len(skipped) - shown
    return lines + (f"\n  ... and {more} more (every skipped file: {listing})" if more > 0 else "")


def check_classes(splits, classes, raw, *, after="", val_from_train=None):
    """Refuse fewer than 2 classes, or a class missing or empty in a split. With `val_from_train`
    (the val_fraction that split train), an empty val class is a train folder too small to split."""
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
            if not splits[split][cls] and split == "val" and val_from_train is not None:
                n = len(splits["train"][cls])
                raise StageError(
                    f"{raw / 'train' / cls}: {n} image(s){where}, too few to split off a val image (no val/ "
                    f"folder; prepare.val_fraction={val_from_train}); add images, or a val/ folder beside train/"
                )
            if not splits[split][cls]:
                raise StageError(
                    f"{raw}/{split}/{cls}: no images{where}; add images or remove the class folder"
                )


def main(argv=None):
    args, params = stage_args(__doc__, ("--raw", "--out", "--report"), argv=argv, outs=("--out", "--report"))
    pp = params.prepare
    if not (args.raw / "train").is_dir():
        raise StageError(
            f"{args.raw}: no train/ folder; expected an ImageFolder tree {args.raw}/train/<class>/<image> "
            "(run `dvc repro download_data` or check data.source)"
        )
    splits = scan_imagefolder(args.raw)
    val_from_train = None if "val" in splits else pp.val_fraction
    if val_from_train is not None:
        splits = stratified_split(splits["train"], pp.val_fraction, params.seed)
        log(f"prepare: no val/ folder, split train by val_fraction={pp.val_fraction} (seed {params.seed})")
    classes = sorted(set(splits["train"]) | set(splits["val"]))
    check_classes(splits, classes, args.raw, val_from_train=val_from_train)
    # all or nothing, the report last: a failed stage never leaves fresh metrics beside stale outs
    with atomic_outputs(args.out, args.report) as (out, report_tmp):
        results = decode_stream(
            args.raw, splits, classes, side=pp.resize, max_pixels=pp.max_pixels, max_aspect=pp.max_aspect
        )
        rows, bad = write_prepared(out, results, classes, pp=pp)
        skipped = skipped_images(args.raw, bad, pp.on_bad_image)
        counts = {
            s: {c: sum(r["split"] == s and r["class"] == c for r in rows) for c in classes}
            for s in ("train", "val")
        }
        left = {s: {c: [0] * n for c, n in cc.items()} for s, cc in counts.items()}
        check_classes(left, classes, args.raw, after="after skipping bad images")
        # the headline only: per-class counts and every skipped file live beside the data
        report = {
            "classes": len(classes),
            "train_images": sum(counts["train"].values()),
            "val_images": sum(counts["val"].values()),
            "skipped": len(skipped),
        }
        write_csv(out / "manifest.csv", rows)
        (out / "classes.json").write_text(json.dumps(classes) + "\n")
        (out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
        write_csv(out / "skipped.csv", skipped, columns=["path", "split", "class", "reason"])
        write_json(report_tmp, report)
    log(
        f"prepare: {report['train_images']} train / {report['val_images']} val images, {len(classes)} classes, "
        f"{len(skipped)} skipped" + skipped_lines(skipped, args.out / "skipped.csv")
    )


if __name__ == "__main__":
    run_main(main)
