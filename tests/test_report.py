"""The plots-page template (cnnlens/report.py) and the loss comparison (cnnlens/compare.py), without
DVC: templates and numbers against independent references. The DVC side (a real page in headless
Chromium with no network) is in tests/test_dvc.py."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from cnnlens import compare, report
from cnnlens.errors import StageError
from cnnlens.metrics import classification_metrics

# ---- the page template


def test_html_id_is_the_id_dvc_render_gives_a_plot():
    from dvc_render.base import Renderer

    for name in ["Loss per epoch", "ROC (val)", "plots/saliency/figures/gradient/0000.png", "a_b+c=d"]:
        assert report.html_id(name) == Renderer.remove_special_chars(name)


def test_every_declared_plot_has_a_section_in_reading_order():
    """Each plot of dvc.yaml (and the files the stages write) lands in the intended section."""
    rules = [[re.compile(r) for r in rs] for rs in report.section_rules()]

    def section(key):
        return next((i for i, rs in enumerate(rules) if any(r.search(key) for r in rs)), None)

    assert section(report.html_id("Loss per epoch")) == 0
    assert section(report.html_id("Seconds per epoch")) == 0
    assert section(report.html_id("Reliability diagram (val)")) == 1
    assert section("plots/eval/misclassified.png") == 1
    assert section("plots/saliency/figures/gradient.png") == 2
    assert section("plots/saliency/figures/before_after.png") == 2
    rand = "Saliency randomisation check (Spearman rho vs. layers re-initialised)"
    assert section(report.html_id(rand)) == 2
    assert section("plots/saliency/figures/gradient/0000.png") == 3
    assert section("plots/activations/layers/layer4.png") == 4
    assert section(report.html_id("Activation sparsity per layer (val)")) == 4
    assert section("plots/somewhere/else.png") is None  # goes to "Other plots", never lost

    import yaml
    from conftest import ROOT

    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(plot, dict):
            key = report.html_id(next(iter(plot)))  # a chart: its div id
        else:
            key = plot if plot.endswith(".png") else plot + "/x.png"  # an image, or a file in a folder
        assert section(key) is not None, plot


def test_template_has_dvcs_placeholder_no_cdn_and_the_bundle_once():
    bundle = "window.vegaEmbed=function(){};/* {braces} </body> */"
    text = report.page_template(bundle, {"vega": "6", "embed": "7", "vlc": "1"})
    assert text.count("{plot_divs}") == 1 and "{refresh_tag}" in text
    assert "{scripts}" not in text, "DVC would put its CDN <script src> tags there"
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert text.count(bundle) == 1
    # dvc_render fills it without complaint
    from dvc_render.html import HTML

    page = HTML(text).embed()
    assert "{plot_divs}" not in page and bundle in page


def test_the_real_bundle_defines_vega_embed_and_can_be_inlined():
    pytest.importorskip("vl_convert")
    bundle, versions = report.vega_bundle()
    assert "window.vegaEmbed=" in bundle.replace(" ", "") and "</script" not in bundle.lower()
    assert versions["vega"] and versions["embed"]


def _png(rng, h=200, w=300) -> bytes:
    """A matplotlib-like RGBA PNG of a photo: a smooth picture with pixel noise, opaque alpha."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 200 // w, y * 200 // h, (x + y) * 200 // (h + w)], -1) + rng.integers(
        0, 24, (h, w, 3)
    )
    rgba = np.dstack([rgb.astype(np.uint8), np.full((h, w), 255, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


def test_shrink_page_rewrites_the_copies_smaller_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    page = tmp_path / "page"
    (page / "static").mkdir(parents=True)
    (page / "index.html").write_text('<h1>x</h1>\n<p id="page-note"></p>\n<img src="static/a.png">')
    originals = {}
    for name in ("a", "b"):
        originals[name] = _png(rng)
        (page / "static" / f"{name}.png").write_bytes(originals[name])
    before, after = report.shrink_page(page)
    assert after < before
    for name, data in originals.items():
        with Image.open(io.BytesIO(data)) as a, Image.open(page / "static" / f"{name}.png") as b:
            assert b.size == a.size and len(b.getcolors(1 << 16)) <= 256
            diff = np.abs(np.asarray(a.convert("RGB"), float) - np.asarray(b.convert("RGB"), float))
            assert diff.mean() < 12, "a palette copy, not another picture"
    assert report.NOTE in (page / "index.html").read_text()


def test_shrink_without_a_page_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main(["shrink", str(tmp_path / "nowhere")])
    assert "no index.html" in str(exc.value) and "dvc plots show -o" in str(exc.value)


# ---- the loss comparison


def _predictions(rng, n=120):
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + (y - 0.5) * rng.uniform(-0.6, 1.6, n), 0.01, 0.99)  # mostly right, some wrong
    return y, np.stack([1 - p1, p1], 1)


def test_eval_statistics_equal_the_evaluate_stages_metrics():
    y, proba = _predictions(np.random.default_rng(1))
    ours = compare.eval_statistics(y, proba)
    ref = classification_metrics(y, proba, ["ants", "bees"])
    for key in ("accuracy", "balanced_accuracy", "ece", "log_loss"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, proba.argmax(1)))


def test_eval_intervals_hold_the_value_and_shrink_to_a_point_when_every_resample_agrees():
    y, proba = _predictions(np.random.default_rng(2))
    ci = compare.eval_intervals(y, proba, n_resamples=300)
    for name, c in ci.items():
        assert c["low"] <= c["mean"] <= c["high"], name
        assert c["n"] == len(y)
    assert 0.02 < ci["accuracy"]["high"] - ci["accuracy"]["low"] < 0.4
    perfect = np.eye(2)[y] * 0.98 + 0.01
    ci = compare.eval_intervals(y, perfect, n_resamples=50)
    assert ci["accuracy"]["low"] == ci["accuracy"]["high"] == 1.0


def test_predictions_arrays_read_the_evaluate_table_and_refuse_a_missing_class():
    table = pd.DataFrame(
        {
            "path": ["a", "b", "c"],
            "true": ["bees", "ants", "bees"],
            "p_ants": [0.2, 0.7, 0.4],
            "p_bees": [0.8, 0.3, 0.6],
        }
    )
    y, proba = compare.predictions_arrays(table)
    assert y.tolist() == [1, 0, 1] and np.allclose(proba.sum(1), 1)
    with pytest.raises(StageError, match="wasps"):
        compare.predictions_arrays(table.assign(true=["wasps", "ants", "bees"]))


def _run(rng, loss, scale):
    y, proba = _predictions(rng)
    table = pd.DataFrame(
        {"true": np.array(["ants", "bees"])[y], "p_ants": proba[:, 0], "p_bees": proba[:, 1]}
    )
    sal = {"gradient": {k: {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 16} for k in compare.SALIENCY_METRICS}}
    return {"loss": loss, "predictions": table, "saliency": sal, "maps": torch.rand(3, 3, 8, 8) * scale}


def test_comparison_table_markdown_and_figures():
    rng = np.random.default_rng(3)
    runs = {loss: _run(rng, loss, s) for loss, s in (("cross_entropy", 1.0), ("focal", 10.0))}
    table = compare.comparison_table(runs, "gradient")
    assert table["loss"].tolist() == ["cross_entropy", "focal"]
    for m in compare.EVAL_METRICS + compare.SALIENCY_METRICS:
        assert (table[f"{m}_low"] <= table[m]).all() and (table[m] <= table[f"{m}_high"]).all(), m
    md = compare.markdown_table(table, "gradient").splitlines()
    assert len(md) == 4 and md[0].count("|") == 1 + 1 + len(compare.EVAL_METRICS + compare.SALIENCY_METRICS)
    assert "gradient pointing_game ↑" in md[0] and re.search(
        r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", md[2]
    )

    scaled, q = compare.shared_scale({k: r["maps"] for k, r in runs.items()})
    # one divisor for all: the loss whose gradients are 10x larger looks brighter, not the same
    assert scaled["focal"].mean() > 3 * scaled["cross_entropy"].mean()
    assert all(float(m.max()) <= 1 and float(m.min()) >= 0 for m in scaled.values())
    ref = np.percentile(torch.cat([r["maps"].abs().amax(1).flatten() for r in runs.values()]).numpy(), 99)
    assert q == pytest.approx(ref, rel=1e-6)

    from cnnlens.figures import saliency_by_loss_figure, tradeoff_figure

    fig = tradeoff_figure(table.to_dict("records"), "gradient")
    assert len(fig.axes[0].lines) >= 2
    fig = saliency_by_loss_figure(np.zeros((3, 8, 8, 3)), scaled, ["a", "b", "c"], method="gradient", scale=q)
    # the panels are composed into one image; a column title per loss above the first row
    assert len(fig.images) == 1
    assert {t.get_text() for t in fig.texts} >= set(scaled)


def test_read_runs_refuses_a_pair_without_an_experiment(tmp_path):
    with pytest.raises(StageError, match="LOSS=EXPERIMENT"):
        compare.read_runs(tmp_path, ["focal"], "gradient")
