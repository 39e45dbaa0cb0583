"""A large synthetic ImageFolder for the large-dataset benchmark (BENCHMARKS.md, ## Large datasets).

python bench/make_imagefolder.py --out /tmp/big --train 50000 --val 2000 --size 128

JPEG files (quality 90), no masks: what a user's own ImageFolder looks like. Written outside the repo;
never commit it. Images are cnnlens.synthetic's, seeded, so two runs give the same tree.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from cnnlens import synthetic  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=int, default=50_000, help="train images (half per class)")
    ap.add_argument("--val", type=int, default=2_000, help="val images (half per class)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = {
        "train": {"ants": args.train // 2, "bees": args.train - args.train // 2},
        "val": {"ants": args.val // 2, "bees": args.val - args.val // 2},
    }
    for split, per in counts.items():
        for cls in per:
            (args.out / split / cls).mkdir(parents=True, exist_ok=True)
    samples = synthetic.generate(counts, args.size, args.seed)
    for s in tqdm(samples, total=args.train + args.val, unit="img", mininterval=10):
        path = args.out / s.split / s.class_name / f"{s.index:06d}.jpg"
        if not path.exists():  # resumable
            s.image.save(path, quality=90)


if __name__ == "__main__":
    main()
