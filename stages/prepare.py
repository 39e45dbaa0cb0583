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

from stages.fileio import StageError, atomic_path, log, run_main, sha256_file, write_json
from stages.images import (BadImage, center_square, decode_rgb, resize_short_side, scan_imagefolder,
                           stratified_split, to_chw_uint8)
from stages.params import stage_args


def process(raw: Path, path: Path, mask_path: Path | None, side: int, max_pixels: int):
    """Decode one file; returns the record, the resized image, the packed square (and its mask)."""
    img, (w, h) = decode_rgb(path, max_pixels, draft_size=side)
    resized = resize_short_side(img, side)
    square = to_chw_uint8(center_square(resized))
    mask = None
    if mask_path is not None:
        m = Image.open(mask_path).convert("L").resize(img.size, Image.NEAREST)
        mask = (np.asarray(center_square(resize_short_side(m, side, Image.NEAREST))) > 127).astype(np.uint8)
    record = {"path": path.relative_to(raw).as_posix(), "orig_width": w, "orig_height": h,
              "sha256": sha256_file(path), "box": box_of(mask)}
    return record, resized, square, mask


def box_of(mask) -> str:
    if mask is None or not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    return f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"


def main(argv=None):
    args, p = stage_args(__doc__, ("--raw", "--out", "--report"), argv)
    if not (args.raw / "train").is_dir():
        raise StageError(f"{args.raw}: no train/ folder; expected an ImageFolder tree {args.raw}/train/<class>/<image> "
                         "(run `dvc repro download_data` or check data.source)")
    splits = scan_imagefolder(args.raw)
    if "val" not in splits:
        splits = stratified_split(splits["train"], p.prepare.val_fraction, p.seed)
        log(f"prepare: no val/ folder, split train by val_fraction={p.prepare.val_fraction} (seed {p.seed})")
    classes = sorted(set(splits["train"]) | set(splits["val"]))
    check_classes(splits, classes, args.raw)
    masks = read_annotations(args.raw)
    jobs = [(split, cls, f) for split in ("train", "val") for cls in classes for f in splits[split][cls]]

    def work(job):
        split, cls, f = job
        try:
            return job, process(args.raw, f, masks.get(f.relative_to(args.raw).as_posix()),
                                p.prepare.resize, p.prepare.max_pixels), None
        except BadImage as exc:
            return job, None, str(exc)

    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding and resizing
        results = list(tqdm(pool.map(work, jobs), total=len(jobs), desc="prepare", unit="img", leave=False, disable=None))

    skipped = [{"path": f.relative_to(args.raw).as_posix(), "split": s, "class": c, "reason": why}
               for (s, c, f), _, why in results if why]
    rows, packs = [], {s: {"images": [], "labels": [], "paths": [], "masks": []} for s in ("train", "val")}
    with atomic_path(args.out) as out:
        for (split, cls, f), res, _ in results:
            if res is None:
                continue
            record, resized, square, mask = res
            name = f"{split}/{cls}/{f.stem}.jpg"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            resized.save(out / name, quality=95)
            rows.append({**record, "prepared": name, "split": split, "class": cls, "label": classes.index(cls)})
            pack = packs[split]
            pack["images"].append(square), pack["labels"].append(classes.index(cls)), pack["paths"].append(record["path"])
            pack["masks"].append(mask)
        counts = {s: {c: sum(r["split"] == s and r["class"] == c for r in rows) for c in classes} for s in packs}
        report = {"classes": len(classes), "train_images": len(packs["train"]["paths"]),
                  "val_images": len(packs["val"]["paths"]), "skipped": len(skipped),
                  "per_class": counts, "skipped_files": skipped}
        write_json(args.report, report)
        if skipped and p.prepare.on_bad_image == "fail":
            lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
            raise StageError(f"{len(skipped)} bad image(s) in {args.raw} and prepare.on_bad_image=fail:\n{lines}\n"
                             "remove or fix them, or set prepare.on_bad_image: skip")
        check_classes({s: {c: [0] * n for c, n in cc.items()} for s, cc in counts.items()}, classes, args.raw,
                      after="after skipping bad images")
        for split, pack in packs.items():
            tensors = {"images": torch.from_numpy(np.stack(pack["images"])),
                       "labels": torch.tensor(pack["labels"], dtype=torch.int64), "paths": pack["paths"]}
            if all(m is not None for m in pack["masks"]):
                tensors["masks"] = torch.from_numpy(np.stack(pack["masks"]))
            torch.save(tensors, out / f"{split}.pt")
        pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
        pd.DataFrame(skipped, columns=["path", "split", "class", "reason"]).to_csv(out / "skipped.csv", index=False)
        (out / "classes.json").write_text(json.dumps(classes) + "\n")
    log(f"prepare: {report['train_images']} train / {report['val_images']} val images, {len(classes)} classes, "
        f"{len(skipped)} skipped" + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped))


def check_classes(splits, classes, raw, after=""):
    where = f" {after}" if after else ""
    if len(classes) < 2:
        raise StageError(f"{raw}: found {len(classes)} class folder(s) ({', '.join(classes) or 'none'}){where}; "
                         "an ImageFolder needs at least 2 (train/<class>/...)")
    for split in ("train", "val"):
        for cls in classes:
            if cls not in splits[split]:
                raise StageError(f"{raw}: class '{cls}' is missing from {split}/; every class must be in both splits")
            if not splits[split][cls]:
                raise StageError(f"{raw}/{split}/{cls}: no images{where}; add images or remove the class folder")


def read_annotations(raw: Path) -> dict[str, Path]:
    """{image path: mask file} from the synthetic source's annotations.csv, if there is one."""
    csv = raw / "annotations.csv"
    if not csv.exists():
        return {}
    table = pd.read_csv(csv)
    return {row.path: raw / row.mask for row in table.itertuples() if isinstance(row.mask, str)}


if __name__ == "__main__":
    run_main(main)
