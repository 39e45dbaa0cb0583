"""The headline `make demo` prints (cnnlens.results), read back from a run's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cnnlens.results import headline_text, read_results

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path) -> None:
    (root / "metrics").mkdir(parents=True)
    (root / "plots" / "saliency").mkdir(parents=True)
    ev = {"accuracy": 0.98693, "balanced_accuracy": 0.9857, "ece": 0.0301}
    tr = {"best_epoch": 7, "stopped_epoch": 7}
    ci = lambda m, lo, hi: {"mean": m, "low": lo, "high": hi}
    quality = {
        "gradient": {"deletion_auc": ci(0.21, 0.18, 0.25), "insertion_auc": ci(0.6, 0.55, 0.66)},
        "random": {"deletion_auc": ci(0.4, 0.35, 0.45), "insertion_auc": ci(0.5, 0.45, 0.55)},
        "n_images": 16,
        "device": "cpu",
    }
    (root / "metrics" / "eval.json").write_text(json.dumps(ev))
    (root / "metrics" / "train.json").write_text(json.dumps(tr))
    (root / "plots" / "saliency" / "quality.json").write_text(json.dumps(quality))


def test_headline_states_the_run_numbers_and_each_method_with_its_interval(tmp_path):
    write_run(tmp_path)
    text = headline_text(read_results(tmp_path), "avx2")
    assert "val accuracy 0.987 (balanced 0.986, ECE 0.030), best epoch 7 of 7, kernels avx2" in text
    assert "gradient: deletion_auc 0.21 [0.18, 0.25], insertion_auc 0.60 [0.55, 0.66]" in text
    assert "random: deletion_auc 0.40 [0.35, 0.45]" in text
    assert "pointing_game" not in text  # no masks: not applicable, not printed as nan
    assert "n_images" not in text and "device" not in text


def test_a_missing_result_is_one_line_naming_the_file(tmp_path):
    write_run(tmp_path)
    (tmp_path / "metrics" / "train.json").write_text("{trunc")
    run = subprocess.run(
        [sys.executable, "-m", "cnnlens.results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'metrics' / 'train.json'}: cannot read it (JSONDecodeError); "
        "run the pipeline first (dvc repro)"
    ]
