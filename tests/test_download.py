"""stages/download.py end to end (as a subprocess, like dvc runs it); cnnlens/fetch.py, sources.py and
weights.py directly.

Everything "downloaded" is served by a small threaded HTTP server on 127.0.0.1; the expected
hashes are computed here with hashlib from the bytes the server sends.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import http.server
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnlens import fetch, sources  # noqa: E402
from cnnlens.errors import StageError  # noqa: E402

TEST_ENV_VARS = ("HYMENOPTERA_URL", "WEIGHTS_URL_OVERRIDE", "WEIGHTS_SHA256", "FETCH_RETRY_BASE_DELAY")


# ---------------------------------------------------------------------------------------------
# fixtures: archives and the HTTP server


def image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tiny_imagefolder() -> dict[str, bytes]:
    """relative path -> bytes: train/val x ants/bees, a PNG and a JPEG each."""
    files = {}
    seed = 0
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG")):
                files[f"{split}/{cls}/{name}"] = image_bytes(seed, fmt)
                seed += 1
    return files


def make_zip(entries) -> bytes:
    """entries: (ZipInfo or name, bytes) pairs."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


FILES = tiny_imagefolder()
GOOD_ZIP = make_zip([(f"hymenoptera_data/{k}", v) for k, v in FILES.items()])
GOOD_SHA = hashlib.sha256(GOOD_ZIP).hexdigest()


def symlink_zip() -> bytes:
    link = zipfile.ZipInfo("hymenoptera_data/train/ants/link.png")
    link.create_system = 3  # unix, so external_attr carries the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip([(f"hymenoptera_data/{k}", v) for k, v in FILES.items()] + [(link, b"/etc/passwd")])


def patch_declared_size(data: bytes, size: int) -> bytes:
    """Overwrite the uncompressed size in the first central-directory header (offset 24)."""
    at = data.index(b"PK\x01\x02")
    return data[: at + 24] + size.to_bytes(4, "little") + data[at + 28 :]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, *args):  # keep pytest output clean
        pass


def serve(body: bytes):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def truncated(body: bytes):
    def route(h):  # announce everything, send half, close (HTTP/1.0 closes after the handler)
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])

    return route


def status(code: int):
    def route(h):
        h.send_error(code)

    return route


def slow(seconds: float, body: bytes):
    def route(h):
        time.sleep(seconds)
        serve(body)(h)

    return route


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.lock = threading.Lock()
    httpd.hits = collections.Counter()
    httpd.routes = {}
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(tmp_path: Path, what: str, params: dict, env: dict | None = None):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = tmp_path / ("raw" if what == "data" else "weights")
    full_env = {k: v for k, v in os.environ.items() if k not in TEST_ENV_VARS}
    full_env.update({"FETCH_RETRY_BASE_DELAY": "0", **(env or {})})
    proc = subprocess.run(
        [sys.executable, "-m", "stages.download", what, "--out", str(out), "--params", str(params_file)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, out


def leftovers(tmp_path: Path) -> list[str]:
    """Everything in tmp_path the stage may have created (the test's own inputs live in src/)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("params.yaml", "src"))


def data_params(**data) -> dict:
    return {"data": data}


def assert_imagefolder(out: Path):
    for rel, body in FILES.items():
        assert (out / rel).read_bytes() == body, rel
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == sorted([*FILES, "SOURCE.json"])


# ---------------------------------------------------------------------------------------------
# data from a URL


def test_hymenoptera_url_override_downloads_and_records_hash(server, tmp_path):
    server.routes["/hymenoptera_data.zip"] = serve(GOOD_ZIP)
    url = server.url("/hymenoptera_data.zip")
    proc, out = run_stage(tmp_path, "data", data_params(source="hymenoptera"), {"HYMENOPTERA_URL": url})
    assert proc.returncode == 0, proc.stderr
    assert_imagefolder(out)  # the hymenoptera_data/ top folder is gone
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["source"] == "hymenoptera" and source["url"] == url
    assert source["sha256"] == GOOD_SHA and source["bytes"] == len(GOOD_ZIP)
    assert source["sha256_pinned"] is False
    assert f"sha256: {GOOD_SHA}" in proc.stderr  # tells how to pin it
    assert leftovers(tmp_path) == ["raw"]


def test_url_source_with_pinned_hash(server, tmp_path):
    server.routes["/pinned.zip"] = serve(GOOD_ZIP)
    proc, out = run_stage(tmp_path, "data", data_params(source=server.url("/pinned.zip"), sha256=GOOD_SHA))
    assert proc.returncode == 0, proc.stderr
    assert_imagefolder(out)
    assert json.loads((out / "SOURCE.json").read_text())["sha256_pinned"] is True


def test_wrong_hash_fails_without_retry_and_leaves_nothing(server, tmp_path):
    server.routes["/wronghash.zip"] = serve(GOOD_ZIP)
    url = server.url("/wronghash.zip")
    wrong = "ab" * 32
    proc, out = run_stage(tmp_path, "data", data_params(source=url, sha256=wrong, retries=3))
    assert proc.returncode == 1
    assert url in proc.stderr and wrong in proc.stderr and GOOD_SHA in proc.stderr
    assert "make demo" in proc.stderr
    assert server.hits["/wronghash.zip"] == 1  # a hash mismatch is final
    assert leftovers(tmp_path) == []


def test_truncated_transfer_is_retried_then_fails(server, tmp_path):
    server.routes["/truncated.zip"] = truncated(GOOD_ZIP)
    url = server.url("/truncated.zip")
    proc, out = run_stage(tmp_path, "data", data_params(source=url, retries=2))
    assert proc.returncode == 1
    assert url in proc.stderr
    assert f"expected {len(GOOD_ZIP)} bytes" in proc.stderr and f"got {len(GOOD_ZIP) // 2}" in proc.stderr
    assert server.hits["/truncated.zip"] == 3
    assert leftovers(tmp_path) == []


def test_http_500_is_retried(server, tmp_path):
    server.routes["/error500.zip"] = status(500)
    url = server.url("/error500.zip")
    proc, out = run_stage(tmp_path, "data", data_params(source=url, retries=3))
    assert proc.returncode == 1
    assert url in proc.stderr and "HTTP 500" in proc.stderr and "expected 200" in proc.stderr
    assert server.hits["/error500.zip"] == 4
    assert leftovers(tmp_path) == []


def test_http_404_is_not_retried(server, tmp_path):
    url = server.url("/missing.zip")
    proc, out = run_stage(tmp_path, "data", data_params(source=url, retries=3))
    assert proc.returncode == 1
    assert url in proc.stderr and "HTTP 404" in proc.stderr
    assert server.hits["/missing.zip"] == 1
    assert leftovers(tmp_path) == []


def test_connection_refused(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/hymenoptera_data.zip"
    proc, out = run_stage(
        tmp_path, "data", data_params(source="hymenoptera", retries=1), {"HYMENOPTERA_URL": url}
    )
    assert proc.returncode == 1
    assert url in proc.stderr and "cannot connect" in proc.stderr and "after 2 attempt" in proc.stderr
    assert "make demo" in proc.stderr and "data.source" in proc.stderr
    assert leftovers(tmp_path) == []


def test_read_timeout(server, tmp_path):
    server.routes["/slow.zip"] = slow(3.0, GOOD_ZIP)
    url = server.url("/slow.zip")
    start = time.monotonic()
    proc, out = run_stage(tmp_path, "data", data_params(source=url, timeout=1, retries=0))
    assert proc.returncode == 1
    assert time.monotonic() - start < 2.9  # gave up before the server answered
    assert url in proc.stderr and "timed out" in proc.stderr
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# unsafe or unusable archives


UNSAFE = {
    "zipslip": (
        make_zip(
            [("hymenoptera_data/train/ants/a.png", FILES["train/ants/a.png"]), ("../evil.txt", b"owned")]
        ),
        {},
        "../evil.txt",
    ),
    "absolute": (make_zip([("/tmp/evil.txt", b"owned")]), {}, "/tmp/evil.txt"),
    "symlink": (symlink_zip(), {}, "link.png"),
    # a real miniature bomb: 2 MiB of zeros compress to a few KiB; the limit is 1 MiB
    "bomb": (
        make_zip([("hymenoptera_data/train/ants/zeros.png", bytes(2 << 20))]),
        {"max_extract_mb": 1},
        "limit",
    ),
    # a header claiming ~4 GiB, over the default 2048 MiB limit
    "absurd": (
        patch_declared_size(make_zip([("hymenoptera_data/train/ants/a.png", b"x" * 100)]), 0xFFFFFFFE),
        {},
        str(0xFFFFFFFE),
    ),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_archive_is_refused(server, tmp_path, kind):
    body, extra, needle = UNSAFE[kind]
    server.routes[f"/{kind}.zip"] = serve(body)
    proc, out = run_stage(tmp_path, "data", data_params(source=server.url(f"/{kind}.zip"), **extra))
    assert proc.returncode == 1, proc.stderr
    assert needle in proc.stderr and "archive" in proc.stderr
    assert leftovers(tmp_path) == []
    assert not list(tmp_path.rglob("evil.txt")) and not (REPO / "evil.txt").exists()


def test_archive_without_train_folder(server, tmp_path):
    server.routes["/notrain.zip"] = serve(make_zip([("stuff/readme.txt", b"hello")]))
    proc, out = run_stage(tmp_path, "data", data_params(source=server.url("/notrain.zip")))
    assert proc.returncode == 1 and "no train/ folder" in proc.stderr and "stuff" in proc.stderr
    assert leftovers(tmp_path) == []


def test_not_a_zip(server, tmp_path):
    server.routes["/page.zip"] = serve(b"<html>not a zip</html>")
    proc, out = run_stage(tmp_path, "data", data_params(source=server.url("/page.zip")))
    assert proc.returncode == 1 and "not a readable zip" in proc.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["C:/evil.txt", "..\\evil.txt", "a/../../evil.txt", "/evil.txt"])
def test_safe_extract_refuses_escaping_names(tmp_path, name):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip([("ok/train/x.txt", b"fine"), (name, b"owned")]))
    with pytest.raises(StageError) as err:
        fetch.safe_extract_zip(archive, tmp_path / "out", max_bytes=1 << 20)
    assert str(archive) in str(err.value) and repr(name) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_safe_extract_detects_lying_size_header(tmp_path):
    # declared 10 bytes, stored 1000: zipfile stops at the declared size and the CRC no longer matches
    archive = tmp_path / "liar.zip"
    archive.write_bytes(patch_declared_size(make_zip([("train/a/x.bin", os.urandom(1000))]), 10))
    with pytest.raises(StageError, match="corrupt"):
        fetch.safe_extract_zip(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_safe_extract_and_find_root(tmp_path):
    archive = tmp_path / "good.zip"
    archive.write_bytes(GOOD_ZIP)
    dest = fetch.safe_extract_zip(archive, tmp_path / "out", max_bytes=1 << 20)
    assert sources.find_imagefolder_root(dest) == dest / "hymenoptera_data"
    for rel, body in FILES.items():
        assert (dest / "hymenoptera_data" / rel).read_bytes() == body
    with pytest.raises(StageError, match="no train/ folder"):
        sources.find_imagefolder_root(dest / "hymenoptera_data" / "val")


# ---------------------------------------------------------------------------------------------
# fetch.download directly: size check and hash prefixes


def test_download_hash_prefix_and_announced_size(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BASE_DELAY", 0.0)
    body = os.urandom(5000)
    digest = hashlib.sha256(body).hexdigest()
    server.routes["/blob.bin"] = serve(body)
    url = server.url("/blob.bin")
    dest = tmp_path / "blob.bin"

    got = fetch.download(url, dest, expected_sha256=digest[:8], expected_size=len(body))
    assert got == {"url": url, "bytes": len(body), "sha256": digest}
    assert dest.read_bytes() == body

    wrong_prefix = format(int(digest[:8], 16) ^ 1, "08x")
    with pytest.raises(StageError) as err:
        fetch.download(url, tmp_path / "other.bin", expected_sha256=wrong_prefix)
    assert wrong_prefix in str(err.value) and digest in str(err.value)

    before = server.hits["/blob.bin"]
    with pytest.raises(StageError) as err:
        fetch.download(url, tmp_path / "other.bin", expected_size=len(body) + 1, retries=3)
    assert f"expected {len(body) + 1} bytes" in str(err.value) and str(len(body)) in str(err.value)
    assert server.hits["/blob.bin"] == before + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]


# ---------------------------------------------------------------------------------------------
# local sources


def test_local_zip(tmp_path):
    (tmp_path / "src").mkdir()
    archive = tmp_path / "src" / "data.zip"
    archive.write_bytes(GOOD_ZIP)
    proc, out = run_stage(tmp_path, "data", data_params(source=str(archive)))
    assert proc.returncode == 0, proc.stderr
    assert_imagefolder(out)
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["sha256"] == GOOD_SHA and source["path"] == str(archive.resolve())
    assert source["url"] is None

    # the same archive, pinned to another hash: refused, and the earlier output stays as it was
    wrong = "cd" * 32
    proc, _ = run_stage(tmp_path, "data", data_params(source=str(archive), sha256=wrong))
    assert proc.returncode == 1
    assert str(archive) in proc.stderr and wrong in proc.stderr and GOOD_SHA in proc.stderr
    assert leftovers(tmp_path) == ["raw"]
    assert_imagefolder(out)


def test_local_imagefolder_dir(tmp_path):
    root = tmp_path / "src" / "wrapper" / "mydata"
    for rel, body in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    (root / ".DS_Store").write_bytes(b"junk")
    proc, out = run_stage(tmp_path, "data", data_params(source=str(tmp_path / "src" / "wrapper")))
    assert proc.returncode == 0, proc.stderr
    assert_imagefolder(out)  # root found one level down, hidden file not copied
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["source"] == "local_dir" and source["path"] == str(root.resolve())
    assert source["files"] == len(FILES) and source["bytes"] == sum(map(len, FILES.values()))
    tree = hashlib.sha256(
        "".join(f"{hashlib.sha256(FILES[k]).hexdigest()}  {k}\n" for k in sorted(FILES)).encode()
    ).hexdigest()
    assert source["tree_sha256"] == tree


def test_missing_local_source_is_a_params_error(tmp_path):
    proc, out = run_stage(tmp_path, "data", data_params(source="no/such/data.zip"))
    assert proc.returncode == 2
    assert "data.source" in proc.stderr and "no/such/data.zip" in proc.stderr
    assert leftovers(tmp_path) == []


def test_bad_sha256_param(tmp_path):
    proc, out = run_stage(tmp_path, "data", data_params(source="synthetic", sha256="xyz"))
    assert proc.returncode == 2 and "data.sha256" in proc.stderr


def test_synthetic(tmp_path):
    from cnnlens import synthetic

    sp = {"image_size": 32, "train_ants": 2, "train_bees": 1, "val_ants": 1, "val_bees": 2}
    proc, out = run_stage(tmp_path, "data", {"seed": 7, "data": {"source": "synthetic", "synthetic": sp}})
    assert proc.returncode == 0, proc.stderr
    expected = list(synthetic.generate(synthetic.counts_from_settings(sp), 32, 7))
    with open(out / "annotations.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(expected) == 6
    for sample, row in zip(expected, rows):
        rel = f"{sample.split}/{sample.class_name}/{sample.index:04d}.png"
        assert row["path"] == rel and row["mask"] == f"masks/{rel}"
        img = Image.open(out / rel)
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.array_equal(np.asarray(img), np.asarray(sample.image))  # PNG is lossless
        mask = Image.open(out / row["mask"])
        assert mask.mode == "L"
        m = np.asarray(mask)
        assert set(np.unique(m)) <= {0, 255} and np.array_equal(m == 255, sample.mask)
        ys, xs = np.nonzero(m)
        box = [int(row[k]) for k in ("x0", "y0", "x1", "y1")]
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # x1/y1 exclusive
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["source"] == "synthetic" and source["seed"] == 7
    assert leftovers(tmp_path) == ["raw"]


# ---------------------------------------------------------------------------------------------
# weights


def test_weights_none(tmp_path):
    proc, out = run_stage(tmp_path, "weights", {"model": {"weights": "none"}})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["weights.json"]
    assert json.loads((out / "weights.json").read_text())["source"] == "none"


def test_weights_override_good_hash(server, tmp_path):
    body = os.urandom(3000)
    digest = hashlib.sha256(body).hexdigest()
    server.routes["/resnet18-fake.pth"] = serve(body)
    url = server.url("/resnet18-fake.pth")
    proc, out = run_stage(
        tmp_path,
        "weights",
        {"model": {"arch": "resnet18", "weights": "IMAGENET1K_V1"}},
        {"WEIGHTS_URL_OVERRIDE": url, "WEIGHTS_SHA256": digest},
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "weights.pth").read_bytes() == body
    info = json.loads((out / "weights.json").read_text())
    assert info == {
        "source": "IMAGENET1K_V1",
        "url": url,
        "arch": "resnet18",
        "bytes": len(body),
        "sha256": digest,
    }
    assert leftovers(tmp_path) == ["weights"]


def test_weights_override_bad_hash(server, tmp_path):
    body = os.urandom(3000)
    server.routes["/resnet18-bad.pth"] = serve(body)
    url = server.url("/resnet18-bad.pth")
    wrong = "ef" * 32
    proc, out = run_stage(
        tmp_path,
        "weights",
        {"model": {"weights": "IMAGENET1K_V1"}},
        {"WEIGHTS_URL_OVERRIDE": url, "WEIGHTS_SHA256": wrong},
    )
    assert proc.returncode == 1
    assert url in proc.stderr and wrong in proc.stderr and hashlib.sha256(body).hexdigest() in proc.stderr
    assert "model.weights" in proc.stderr  # the offline hint
    assert leftovers(tmp_path) == []


def test_weights_local_file(tmp_path):
    import torch
    import torchvision

    (tmp_path / "src").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "src" / "mine.pth")
    body = (tmp_path / "src" / "mine.pth").read_bytes()
    proc, out = run_stage(tmp_path, "weights", {"model": {"weights": str(tmp_path / "src" / "mine.pth")}})
    assert proc.returncode == 0, proc.stderr
    assert (out / "weights.pth").read_bytes() == body
    info = json.loads((out / "weights.json").read_text())
    assert info["source"] == "local" and info["sha256"] == hashlib.sha256(body).hexdigest()

    proc, _ = run_stage(tmp_path, "weights", {"model": {"weights": "IMAGENET1K_V2"}})
    assert proc.returncode == 2 and "model.weights" in proc.stderr and "IMAGENET1K_V2" in proc.stderr


def test_torchvision_weight_urls_carry_a_hash_prefix():
    pytest.importorskip("torchvision")
    import torchvision

    from cnnlens.weights import RESNET18_SHA256, RESNET18_URL, RESNET_URLS, imagenet_weights

    assert imagenet_weights("resnet18") == (RESNET18_URL, 46_830_571, RESNET18_SHA256)
    assert RESNET18_URL.endswith(f"-{RESNET18_SHA256[:8]}.pth")  # torch.hub's naming rule holds
    for arch in ("resnet34", "resnet50", "mobilenet_v3_small"):
        url, size, prefix = imagenet_weights(arch)
        assert url.startswith("https://download.pytorch.org/models/") and size is None
        assert len(prefix) >= 8 and url.rsplit("/", 1)[-1].endswith(f"-{prefix}.pth")
    # the ResNets' URLs, known without importing torchvision, are the ones it lists
    for arch, url in {"resnet18": RESNET18_URL, **RESNET_URLS}.items():
        assert url == torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url, arch


def test_what_comes_first_and_is_data_or_weights(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"weights": "none"}}))
    for argv in ([], ["--out", str(tmp_path / "w")], ["models", "--out", str(tmp_path / "w")]):
        proc = subprocess.run(
            [sys.executable, "-m", "stages.download", *argv, "--params", str(params)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "data, weights" in proc.stderr, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_fetch_sends_the_project_user_agent(server, tmp_path):
    import cnnlens

    seen = []

    def handler(h):
        seen.append(h.headers["User-Agent"])
        serve(b"x")(h)

    server.routes["/ua"] = handler
    fetch.download(server.url("/ua"), tmp_path / "ua.bin", retries=0)
    assert seen == [f"cnnlens/{cnnlens.__version__} (+python urllib)"]
