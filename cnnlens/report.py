"""The plots page: an HTML template for `dvc plots show|diff --html-template` that works offline and
reads top to bottom.

python -m cnnlens.report template -o build/plots.html
python -m cnnlens.report shrink demo/dvc_plots     # after `dvc plots show`: bound the page size

DVC's default page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so with no network
every chart is an empty box. This template inlines them (the bundle vl-convert-python ships, built
from the npm packages; generated, never edited by hand) and leaves out DVC's `{scripts}` so no CDN
tag is added. DVC orders a page by itself: every chart first (dvc.yaml order), then every image
sorted by folder. A short script at the end of the page moves each plot into its section, so the
page reads: training, evaluation, saliency overview, per-image saliency, activations.

`shrink` rewrites the page's copies of the images (DVC copies them into <page>/static/) as
256-colour PNGs: matplotlib writes RGBA photos-with-heat-maps at ~4 bits per pixel, and the demo
page would be ~8 MB; the copies look the same and take about a third. The originals under plots/
are untouched, and the page says so.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import re
import sys
from pathlib import Path

# (heading, note, rules): a plot goes to the first section with a matching rule. A rule is a regex
# on an image's path, or "title:" + a chart's plot id in dvc.yaml.
SECTIONS = [
    (
        "1. Training",
        "Loss and accuracy per epoch (train and val), learning rate, time per epoch.",
        [
            "title:Loss per epoch",
            "title:Accuracy per epoch",
            "title:Learning rate",
            "title:Seconds per epoch",
        ],
    ),
    (
        "2. Evaluation (val)",
        "Confusion, ROC, precision-recall, calibration; then the misclassified images.",
        [
            "title:Confusion matrix (val, normalised)",
            "title:ROC (val)",
            "title:Precision-recall (val)",
            "title:Reliability diagram (val)",
            r"^plots/eval/",
        ],
    ),
    (
        "3. Saliency: overview per method, before/after fine-tuning, randomisation check",
        "One row per image and method; the randomisation chart: how far the maps move when the "
        "weights are re-initialised (a map that does not move does not explain the model).",
        [
            r"^plots/saliency/figures/[^/]+\.png$",
            "title:Saliency randomisation check (Spearman rho vs. layers re-initialised)",
        ],
    ),
    (
        "4. Saliency per image",
        "Each image under each method: input, per-channel maps, overlay.",
        [r"^plots/saliency/"],
    ),
    (
        "5. Activations",
        "One compact figure per layer. The full grids (every image, top maps per layer) are in "
        '<a href="../plots/activations/grids/">plots/activations/grids/</a>.',
        [r"^plots/activations/", "title:Activation sparsity per layer (val)"],
    ),
]


def html_id(name: str) -> str:
    """The div id DVC (dvc_render Renderer.remove_special_chars) gives a plot named `name`."""
    return name.translate({ord(c): "_" for c in r"!@#$%^&*()[]{};,<>?\/:.|`~=_+ "})


def section_rules(sections=SECTIONS) -> list[list[str]]:
    """Per section, JavaScript regex sources matched against a plot's key: an image's path, or
    the div id of a chart."""
    return [
        ["^" + re.escape(html_id(r[6:])) + "$" if r.startswith("title:") else r for r in rules]
        for _, _, rules in sections
    ]


# Runs after DVC's plot divs are parsed (their vegaEmbed calls already hold the elements; moving a
# rendered div keeps its chart). Key: the first <p> of an image div holds its path.
ORDER_JS = """
(function () {
  var rules = %s, holder = document.getElementById('dvc-plots');
  var sections = Array.from(document.querySelectorAll('section.plots'));
  Array.from(holder.children).forEach(function (div) {
    var p = div.querySelector('p'), img = div.querySelector('img');
    var key = img && p ? p.textContent.trim() : (div.id || '').trim();
    var i = rules.findIndex(function (rs) { return rs.some(function (r) { return new RegExp(r).test(key); }); });
    (i < 0 ? document.getElementById('other') : sections[i]).appendChild(div);
  });
  document.getElementById('other').hidden = !document.querySelector('#other > div');
})();
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>cnnlens: training, evaluation, saliency, activations</title>
<style>
body {{ font-family: sans-serif; margin: 1em 2em; }}
section.plots > div {{ margin: 0.5em 0; }}
h2 {{ border-bottom: 1px solid #888; margin-top: 1.5em; }}
img {{ max-width: 100%; }}
</style>
<!-- vega {vega}, vega-lite, vega-embed {embed}: vl-convert-python {vlc} javascript_bundle(), inlined -->
<script>
(function () {{
{bundle}
}})();
</script>
</head>
<body>
<h1>cnnlens report</h1>
<p id="page-note"></p>
{sections}
<section id="other" class="extra"><h2>Other plots</h2></section>
<div id="dvc-plots">
{{plot_divs}}
</div>
<script>{order}</script>
</body>
</html>
"""


def vega_bundle() -> tuple[str, dict]:
    """vega + vega-lite + vega-embed as one classic script that sets window.vegaEmbed (and vega,
    vegaLite), with the versions. The bundle declares top-level consts, so the page wraps it in a
    function: otherwise its names would clash with DVC's `var spec` in the global scope."""
    try:
        import vl_convert as vlc
    except ImportError as exc:  # a clear line instead of a traceback
        raise SystemExit("error: vl-convert-python is missing: pip install -r requirements.txt") from exc
    bundle = vlc.javascript_bundle()
    if "</script" in bundle.lower():
        raise SystemExit("error: the vega bundle contains '</script' and cannot be inlined")
    versions = {"vega": vlc.get_vega_version(), "embed": vlc.get_vega_embed_version()}
    versions["vlc"] = getattr(vlc, "__version__", "?")
    return bundle, versions


def page_template(bundle: str, versions: dict, sections=SECTIONS) -> str:
    """The template text: DVC fills {plot_divs} (and {refresh_tag}); {scripts} is left out on
    purpose, so DVC adds no CDN <script> tags."""
    blocks = "\n".join(
        f'<section class="plots"><h2>{html.escape(h)}</h2><p>{note}</p></section>' for h, note, _ in sections
    )
    order = ORDER_JS % json.dumps(section_rules(sections))
    # doubled braces in the bundle would be wrong: insert it after formatting the rest
    text = PAGE.format(
        sections=blocks, order=order, bundle="@@BUNDLE@@", refresh_tag="{refresh_tag}", **versions
    )
    return text.replace("@@BUNDLE@@", bundle)


def palette_png(data: bytes, colours: int = 256) -> bytes:
    """A PNG re-encoded with at most `colours` colours (median cut, no dithering, alpha dropped:
    matplotlib's is opaque); the input itself when that is not smaller."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(data) else data


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


NOTE = "Images on this page are 256-colour copies (to keep the page small); the originals are under plots/."


def shrink_page(page: Path) -> tuple[int, int]:
    """Replace every PNG copy under <page>/static with its palette_png and say so on the page.
    Returns the page's total bytes (index.html + static/) before and after."""
    before = dir_bytes(page)
    for png in sorted((page / "static").glob("*.png")):
        png.write_bytes(palette_png(png.read_bytes()))
    index = page / "index.html"
    index.write_text(index.read_text(encoding="utf8").replace('<p id="page-note"></p>', f"<p>{NOTE}</p>", 1))
    return before, dir_bytes(page)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["template", "shrink"])
    ap.add_argument("path", nargs="?", type=Path, help="shrink: the page folder (`dvc plots show -o`)")
    ap.add_argument("-o", "--out", type=Path, help="template: where to write it")
    args = ap.parse_args(argv)
    if args.what == "shrink":
        if args.path is None or not (args.path / "index.html").is_file():
            raise SystemExit(
                f"error: {args.path}: no index.html there; give the folder `dvc plots show -o` wrote"
            )
        before, after = shrink_page(args.path)
        print(f"plots page: {args.path} {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", file=sys.stderr)
        return
    if args.out is None:
        raise SystemExit("error: template needs -o PATH, e.g. -o build/plots.html")
    bundle, versions = vega_bundle()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page_template(bundle, versions), encoding="utf8")
    print(
        f"plots template: {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, vega inlined)", file=sys.stderr
    )


if __name__ == "__main__":
    main()
