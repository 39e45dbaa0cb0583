"""The model registry end to end (integration): an author runs the pipeline in a git repository with a DVC
local remote, tags a version and pushes, as docs/use-the-model.md says; a teammate's fresh clone runs
`dvc artifacts get <repo> resnet-classifier` (the page's block) and gets exactly the pushed model, byte for
byte, and `python -m cnnlens.predict` runs on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dvc_helpers import dvc, dvc_env, git, scratch_tree, sh, write_tiny_params
from test_use_docs import doc_blocks, my_photos, run_block
from use_helpers import needs_ort

pytestmark = [pytest.mark.integration, needs_ort]


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def run_doc(kind: str, cwd: Path, **env) -> str:
    """The page's `kind` blocks in `cwd`, in DVC's test environment (no user config, one thread)."""
    out = []
    for lang, code in doc_blocks(kind):
        proc = run_block(lang, code, cwd, env={**dvc_env(), "PYTHONPATH": "", **env})
        assert proc.returncode == 0, (
            f"{kind} block failed:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
        out.append(proc.stdout)
    return "".join(out)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(author's project, the bare git repository it pushed to): the author block run on TINY params."""
    base = tmp_path_factory.mktemp("registry")
    author = scratch_tree(base / "author")
    write_tiny_params(author)
    origin = base / "origin.git"
    git(base, "init", "-q", "--bare", "-b", "main", origin)
    git(author, "init", "-q", "-b", "main")
    git(author, "remote", "add", "origin", origin)
    dvc(author, "remote", "add", "-d", "shared", base / "dvc-remote")
    git(author, "add", "-A")
    git(author, "commit", "-qm", "tiny params, a DVC remote")
    git(author, "push", "-q", "-u", "origin", "main")
    run_doc("author", author)
    return author, origin


def test_a_fresh_clone_gets_exactly_the_pushed_model_and_predicts(published, tmp_path):
    author, origin = published
    assert "resnet-classifier@v1.0.0" in git(origin, "tag").stdout
    assert (
        yaml.safe_load((author / "dvc.yaml").read_text())["artifacts"]["resnet-classifier"]["path"]
        == "models"
    )
    teammate = tmp_path / "teammate"
    git(tmp_path, "clone", "-q", origin, teammate)
    assert not (teammate / "models").exists(), "a git clone has no model until it asks for one"
    my_photos(author, teammate / "my_photos")
    table = run_doc("teammate", teammate, REPO=str(origin))
    assert files_of(teammate / "models") == files_of(author / "models")
    lines = table.strip().splitlines()  # dvc's "Downloaded ..." line, then predict's table
    rows = lines[[line.split()[:2] for line in lines].index(["path", "predicted"]) + 1 :]
    assert [r.split()[0] for r in rows] == [
        "my_photos/ant.jpg",
        "my_photos/more/bee-0000.png",
        "my_photos/more/bee-0001.png",
    ]
    # the ONNX model of the same version, from a folder that is no clone at all
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dvc(elsewhere, "artifacts", "get", origin, "resnet-classifier-onnx", "--rev", "v1.0.0")
    assert files_of(elsewhere / "export") == files_of(author / "export")
    sh(
        teammate,
        "python",
        "-m",
        "cnnlens.predict",
        "my_photos",
        "--backend",
        "onnx",
        "--model",
        elsewhere / "export",
    )
