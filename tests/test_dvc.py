"""DVC behaviour of the real dvc.yaml on a tiny synthetic run: what reruns after an edit, experiments
to compare losses, recovery from a killed run, and the plots page.

Each test works on its own copy of one finished project (see dvc_helpers.finished_project); DVC
never runs in the real working tree. The assertions read what DVC itself reports.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from dvc_helpers import (
    ROOT,
    copy_project,
    dvc,
    dvc_env,
    dvc_json,
    dvc_yaml_stages,
    finished_project,
    git,
    metrics_files,
    set_params,
    stage_report,
)

# slow (scratch repositories, DVC, several processes, kills): `make test-all`, not `make test`
pytestmark = pytest.mark.integration

STAGES = dvc_yaml_stages()
DOWNSTREAM_OF_MODEL = {"finetune", "evaluate", "saliency", "activations", "export"}


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    return finished_project(tmp_path_factory)


@pytest.fixture
def project(finished, tmp_path):
    return copy_project(finished[0], tmp_path / "project")


def status(project: Path) -> dict:
    return dvc_json(project, "status")


def test_full_repro_runs_every_stage_then_nothing_is_left_to_do(finished, project):
    first = stage_report(finished[1])
    assert first["ran"] == set(STAGES), (
        f"the first `dvc repro` should run every stage:\n{finished[1][-3000:]}"
    )
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for name in metrics_files(project):
        assert isinstance(json.loads((project / name).read_text()), dict), name

    assert status(project) == {}
    lock_before = (project / "dvc.lock").read_bytes()
    again = dvc(project, "repro").stdout
    report = stage_report(again)
    assert report["ran"] == set() and report["restored"] == set(), again
    assert report["skipped"] == set(STAGES), again
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert git(project, "status", "--porcelain").stdout == "", "a no-op repro must not touch tracked files"


def _check_edit(project: Path, out: str, key: str, value, changed: str, reruns: set[str]) -> None:
    report = stage_report(out)
    assert report["ran"] == reruns, out
    assert report["skipped"] == set(STAGES) - reruns, out
    section, leaf = key.split(".")
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"][changed]["params"]["params.yaml"]
    assert (locked[key] if key in locked else locked[section][leaf]) == value
    assert status(project) == {}


@pytest.mark.parametrize(
    "key, value, changed, reruns",
    [
        ("saliency.bootstrap", 60, "saliency", {"saliency"}),
        ("prepare.resize", 44, "prepare", {"prepare"} | DOWNSTREAM_OF_MODEL),
    ],
)
def test_editing_a_param_reruns_exactly_the_stages_it_affects(project, key, value, changed, reruns):
    set_params(project, **{key: value})
    # `dvc status` names only the stage that reads the key; the rest follow through changed outputs
    assert set(status(project)) == {changed}
    _check_edit(project, dvc(project, "repro").stdout, key, value, changed, reruns)


def _kill_during_finetune(project: Path) -> tuple[int, str]:
    """Start `dvc repro`, SIGKILL its whole process group once finetune has logged its first epoch
    (into the dvclive temp dir), return (exit status, what DVC had printed)."""
    log = project.parent / "killed-repro.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=project,
            env=dvc_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = lambda: (
            "Running stage 'finetune'" in log.read_text()
            and any(project.glob("plots/.train.*.tmp/plots/metrics/train_loss.tsv"))
        )
        _wait_for(started, proc, 300, "finetune to log its first epoch")
        assert proc.poll() is None, f"dvc repro ended before it could be killed:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def loss_edited(finished, tmp_path_factory):
    """A copy of the finished project where `train.loss: bce_with_logits` was set, a `dvc repro` was
    killed in the middle of finetune, and a second `dvc repro` completed. One expensive run serves
    three tests: the train.loss edit (what the completed repro ran), the kill (the state between
    the two runs, the final outputs) and the experiments (the bce run is now in the run-cache)."""
    project = copy_project(finished[0], tmp_path_factory.mktemp("loss") / "project")
    set_params(project, **{"train.loss": "bce_with_logits"})
    facts = {
        "project": project,
        "status_before": set(status(project)),
        "lock_before": (project / "dvc.lock").read_bytes(),
    }
    facts["killed_rc"], facts["killed_log"] = _kill_during_finetune(project)
    facts.update(
        lock_after_kill=(project / "dvc.lock").read_bytes(),
        status_after_kill=status(project),
        models_after_kill=(project / "models").exists(),
        train_metrics_after_kill=(project / "metrics/train.json").exists(),
    )
    facts["output"] = dvc(project, "repro").stdout
    return facts


def test_editing_train_loss_reruns_finetune_and_everything_downstream(loss_edited):
    assert loss_edited["status_before"] == {"finetune"}
    _check_edit(
        loss_edited["project"],
        loss_edited["output"],
        "train.loss",
        "bce_with_logits",
        "finetune",
        DOWNSTREAM_OF_MODEL,
    )


def test_killed_repro_during_finetune_recovers_on_the_next_repro(loss_edited):
    project = loss_edited["project"]
    assert loss_edited["killed_rc"] == -signal.SIGKILL
    assert "Running stage 'evaluate'" not in loss_edited["killed_log"]
    # nothing half-done was recorded: the lock still holds the old run, DVC knows finetune must rerun,
    # and no partial model sits at the output path (DVC removed the old one before running the
    # stage; the stage writes models/ through a temporary directory renamed only when complete)
    assert loss_edited["lock_after_kill"] == loss_edited["lock_before"]
    assert "finetune" in loss_edited["status_after_kill"]
    assert not loss_edited["models_after_kill"] and not loss_edited["train_metrics_after_kill"]

    # the next `dvc repro` (test above: it ran exactly finetune and what follows) left valid outputs
    assert status(project) == {}
    state = torch.load(project / "models" / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (2, 512)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["stopped_epoch"] == epochs
    rows = (project / "plots/train/plots/metrics/train_loss.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + epochs, "one header + one row per epoch of the completed run only"
    meta = json.loads((project / "models" / "model.json").read_text())
    assert meta["loss"] == "bce_with_logits"
    # the killed run's temporaries were cleared by the rerun, and git would ignore them anyway
    assert not list(project.glob("plots/.train.*.tmp")) and not list(project.glob(".models.*.tmp"))
    assert subprocess.run(["git", "check-ignore", "-q", "plots/.train.x.tmp"], cwd=project).returncode == 0


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def test_loss_comparison_with_experiments(loss_edited, tmp_path):
    """Two named experiments that differ only in train.loss, compared with exp show / params diff /
    metrics diff. Experiment names work directly as revisions for `dvc params|metrics diff`.

    Runs in a copy of the loss_edited project reset to the committed baseline: its run-cache already
    holds the bce_with_logits run, so the bce experiment restores those stages instead of running them.
    """
    project = copy_project(loss_edited["project"], tmp_path / "project")
    git(project, "reset", "-q", "--hard", "HEAD")
    dvc(project, "checkout", "-q")
    assert status(project) == {}
    # the committed run's metrics: cached outputs (not in git), checked out from .dvc/cache per dvc.lock
    committed = {name: json.loads((project / name).read_text()) for name in metrics_files(project)}
    ce = dvc(project, "exp", "run", "-n", "ce", "-S", "train.loss=cross_entropy").stdout
    # cross_entropy is the committed value: nothing to run, the experiment records the baseline
    assert stage_report(ce)["ran"] == set(), ce
    bce = dvc(project, "exp", "run", "-n", "bce", "-S", "train.loss=bce_with_logits").stdout
    report = stage_report(bce)
    assert report["restored"] == DOWNSTREAM_OF_MODEL and report["ran"] == set(), bce

    head = git(project, "rev-parse", "HEAD").stdout.strip()
    rows = dvc_json(project, "exp", "show")
    baseline = next(r for r in rows if r["rev"] == head)
    exps = {e["name"]: e["revs"][0]["data"] for e in baseline["experiments"]}
    assert set(exps) == {"ce", "bce"}
    for name, loss in (("ce", "cross_entropy"), ("bce", "bce_with_logits")):
        assert exps[name]["params"]["params.yaml"]["data"]["train"]["loss"] == loss
        assert set(exps[name]["metrics"]) == set(metrics_files(project))
    # the ce experiment is the committed run: its metrics are the ones dvc.lock records
    for name in metrics_files(project):
        assert _flatten(exps["ce"]["metrics"][name]["data"]) == _flatten(committed[name]), name
    # and the bce experiment is exactly the run the loss_edited project did (restored, not rerun)
    for name in metrics_files(project):
        ran = json.loads((loss_edited["project"] / name).read_text())
        assert _flatten(exps["bce"]["metrics"][name]["data"]) == _flatten(ran), name

    params_diff = dvc_json(project, "params", "diff", "ce", "bce")
    assert params_diff == {"params.yaml": {"train.loss": {"old": "cross_entropy", "new": "bce_with_logits"}}}

    metrics_diff = dvc_json(project, "metrics", "diff", "ce", "bce")
    assert "metrics/data.json" not in metrics_diff, "prepare did not rerun; its metrics cannot differ"
    assert {"metrics/train.json", "metrics/eval.json"} <= set(metrics_diff)
    assert "total_seconds" in metrics_diff["metrics/train.json"], "finetune reran: another training run"
    for path, entries in metrics_diff.items():
        old, new = (
            _flatten(exps["ce"]["metrics"][path]["data"]),
            _flatten(exps["bce"]["metrics"][path]["data"]),
        )
        for key, d in entries.items():
            assert (d["old"], d["new"]) == (old[key], new[key]), (path, key)
            assert d["old"] != d["new"]
        # and every numeric metric that changed is reported
        assert {k for k in old if k in new and old[k] != new[k]} == set(entries), path


def _wait_for(predicate, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate() or proc.poll() is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- the plots page ----------------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.div_ids, self.img_srcs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "id" in attrs:
            self.div_ids.append(attrs["id"].strip())
        elif tag == "img":
            self.img_srcs.append(attrs["src"])


def _specs(page: str) -> dict[str, dict]:
    """{div id: vega-lite spec} from the `var spec = {...}; vegaEmbed('#id', spec)` blocks."""
    decoder, specs = json.JSONDecoder(), {}
    for m in re.finditer(r"var spec = ", page):
        spec, end = decoder.raw_decode(page, m.end())
        target = re.match(r"\s*;?\s*vegaEmbed\('#([^']+)'", page[end:])
        assert target, page[end : end + 200]
        specs[target.group(1)] = spec
    return specs


@pytest.fixture(scope="session")
def page_template(tmp_path_factory):
    """The offline page template (`make build/plots.html` writes the same file)."""
    from cnnlens.report import page_template, vega_bundle

    path = tmp_path_factory.mktemp("template") / "plots.html"
    path.write_text(page_template(*vega_bundle()), encoding="utf8")
    return path


@pytest.fixture(scope="module")
def plots_page(finished, page_template, tmp_path_factory):
    """`dvc plots show --html-template ... -o DIR` in a copy of the finished project:
    (project, DIR, declared plots)."""
    project = copy_project(finished[0], tmp_path_factory.mktemp("plots") / "project")
    out = project.parent / "dvc_plots"
    dvc(project, "plots", "show", "-q", "--html-template", page_template, "-o", out)
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    return project, out, declared


def test_plots_show_writes_one_page_with_every_declared_plot(plots_page):
    project, out, declared = plots_page
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "static"]
    page = (out / "index.html").read_text()
    parsed = _Page()
    parsed.feed(page)
    specs = _specs(page)
    assert not re.search(r"<script[^>]*\bsrc=", page), "every script is inlined: the page works offline"
    assert "window.vegaEmbed" in page

    charts = {next(iter(p)): next(iter(p.values())) for p in declared if isinstance(p, dict)}
    images = [p for p in declared if isinstance(p, str)]
    by_title = {s["title"]["text"]: s for s in specs.values()}
    assert set(by_title) == set(charts), "one chart per declared plot id, no more"
    assert set(specs) <= set(parsed.div_ids)
    for plot_id, cfg in charts.items():
        spec, rows = by_title[plot_id], by_title[plot_id]["data"]["values"]
        for path, fields in cfg["y"].items():
            assert (project / path).is_file(), path
            for field in [fields] if isinstance(fields, str) else fields:  # one column, or several
                assert any(field in row for row in rows), f"{plot_id}: no {field} values from {path}"
        assert all(cfg["x"] in row for row in rows), f"{plot_id}: rows without x={cfg['x']}"
        text = json.dumps(spec)
        assert json.dumps(cfg["x_label"]) in text and json.dumps(cfg["y_label"]) in text, plot_id

    # the image plots (a declared folder stands for every PNG in it): one <img> each, a copy of the file
    images = [
        f.relative_to(project).as_posix()
        for i in images
        for f in (sorted((project / i).rglob("*.png")) if (project / i).is_dir() else [project / i])
    ]
    assert len(images) > 10  # the gallery, saliency figures and the per-layer activation figures
    assert len(parsed.img_srcs) == len(images)
    for image in images:
        want = (project / image).read_bytes()
        assert want.startswith(b"\x89PNG"), image
        assert any((out / src).read_bytes() == want for src in parsed.img_srcs), image


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# After load: per chart div, whether vega drew marks (a canvas with a painted pixel, or an SVG with a
# non-empty box); per image, whether it decoded; and the section each plot ended up in.
PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  function drawn(div) {
    var c = div.querySelector('canvas.marks'), s = div.querySelector('svg.marks');
    if (c && c.width > 0 && c.height > 0) {
      var px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (var i = 3; i < px.length; i += 4) { if (px[i] > 0) return true; }
    }
    if (s) { var b = s.getBBox(); return b.width > 0 && b.height > 0 && s.querySelectorAll('path,text').length > 0; }
    return false;
  }
  var charts = {};
  // a chart div: any plot div without an <img> (vega-embed replaces its <script> with the chart)
  document.querySelectorAll('div[id]').forEach(function (d) {
    if (/^(dvc-plots)$/.test(d.id) || d.querySelector('img') || d.querySelector('div[id]')) return;
    charts[d.id] = drawn(d); });
  var imgs = Array.from(document.images);
  var order = Array.from(document.querySelectorAll('section')).map(function (sec) {
    return Array.from(sec.children).filter(function (d) { return d.tagName === 'DIV'; })
      .map(function (d) { return d.id; }); });
  var p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({
    images: imgs.length,
    not_loaded: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
      .map(function (i) { return i.src; }),
    charts: charts, sections: order, vega: typeof vegaEmbed !== 'undefined'});
  document.body.appendChild(p);
}, 1000); });
</script>"""


def _chromium(tmp_path: Path) -> list[str]:
    """Headless chromium with the network unreachable: every host name fails to resolve and every
    request goes to a proxy on a closed port, so only file:// works."""
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
    ]


def _probe(out: Path, tmp_path: Path) -> dict:
    probe = out / "probe.html"
    head, end, tail = (out / "index.html").read_text().rpartition("</body>")  # the bundle has one too
    probe.write_text(head + PROBE + end + tail)
    dom = subprocess.run(
        _chromium(tmp_path) + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180
    )
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom.stdout)
    assert found, f"the page did not finish loading in chromium:\n{dom.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)"
)
def test_plots_page_renders_offline_in_headless_chromium(plots_page, tmp_path):
    """Loads the page in a real browser with no network: every declared chart must draw (vega is
    inlined by the template), every image must decode, and the plots must sit in the template's
    sections in reading order."""
    from cnnlens.report import SECTIONS, html_id

    project, out, declared = plots_page
    result = _probe(out, tmp_path)
    n_images = sum(
        len(list((project / p).rglob("*.png"))) if (project / p).is_dir() else 1
        for p in declared
        if isinstance(p, str)
    )
    assert result["images"] == n_images and result["not_loaded"] == [], result
    assert result["vega"], "vegaEmbed is not defined: the inlined bundle did not load"
    want = {html_id(next(iter(p))) for p in declared if isinstance(p, dict)}
    assert set(result["charts"]) == want, result["charts"]
    assert all(result["charts"].values()), f"charts that drew nothing: {result['charts']}"

    *sections, other = result["sections"]
    assert len(sections) == len(SECTIONS) and other == [], result["sections"]
    assert all(sections), f"an empty section: {result['sections']}"
    assert sections[0][0] == html_id("Loss per epoch"), "the page starts with the training curves"
    assert html_id("plots/eval/misclassified.png") in sections[1]
    assert all(d.startswith("plots_activations_layers_") or "sparsity" in d for d in sections[-1])

    shot = tmp_path / "page.png"
    subprocess.run(
        _chromium(tmp_path)
        + ["--window-size=1280,4000", f"--screenshot={shot}", (out / "index.html").as_uri()],
        capture_output=True,
        timeout=180,
    )
    from PIL import Image

    with Image.open(shot) as im:
        lo, hi = im.convert("L").getextrema()
    assert hi - lo > 50, "the screenshot is blank"


# --- the loss comparison (cnnlens/compare.py, `make compare`) ------------------------------------------


def test_compare_reads_each_experiment_and_writes_one_comparison(loss_edited, page_template, tmp_path):
    """`python -m cnnlens.compare` on two named experiments (ce, and bce restored from the
    run-cache), as scripts/compare.sh runs it: the table holds each experiment's own numbers,
    the figures exist, `dvc plots diff` of the experiments renders on the page template, and a
    LOSS=EXPERIMENT pair that lies about the loss is refused in one line."""
    project = copy_project(loss_edited["project"], tmp_path / "project")
    git(project, "reset", "-q", "--hard", "HEAD")
    dvc(project, "checkout", "-q")
    for loss in ("bce_with_logits", "cross_entropy"):
        dvc(project, "exp", "run", "-n", f"loss-{loss}", "-S", f"train.loss={loss}")
    pairs = ["cross_entropy=loss-cross_entropy", "bce_with_logits=loss-bce_with_logits"]
    run = subprocess.run(
        [sys.executable, "-m", "cnnlens.compare", "--repo", project, "--out", tmp_path / "cmp", *pairs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv").set_index("loss")
    assert list(table.index) == ["cross_entropy", "bce_with_logits"]
    rows = {
        e["name"]: e["revs"][0]["data"]
        for r in dvc_json(project, "exp", "show")
        for e in r["experiments"] or []
    }
    for loss in table.index:
        metrics = rows[f"loss-{loss}"]["metrics"]
        ev, sal = metrics["metrics/eval.json"]["data"], metrics["metrics/saliency.json"]["data"]
        for key in ("accuracy", "balanced_accuracy", "ece", "log_loss"):  # the evaluate stage's own numbers
            assert table.loc[loss, key] == pytest.approx(ev[key], abs=1e-5), (loss, key)
        assert table.loc[loss, "deletion_auc"] == pytest.approx(sal["gradient"]["deletion_auc"])  # a mean
    for png in ("accuracy_vs_saliency.png", "saliency_by_loss.png"):
        assert (tmp_path / "cmp" / png).read_bytes().startswith(b"\x89PNG")
    assert "| cross_entropy |" in (tmp_path / "cmp" / "comparison.md").read_text()

    dvc(
        project,
        "plots",
        "diff",
        "-q",
        "loss-cross_entropy",
        "loss-bce_with_logits",
        "--html-template",
        page_template,
        "-o",
        tmp_path / "diff",
    )
    page = (tmp_path / "diff" / "index.html").read_text()
    assert "window.vegaEmbed" in page and "loss-bce_with_logits" in page

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnlens.compare",
            "--repo",
            project,
            "--out",
            tmp_path / "bad",
            "focal=loss-cross_entropy",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: experiment 'loss-cross_entropy' trained with train.loss=cross_entropy, not focal"
    )
