"""Issue #20, item 12, end to end: 64 bytes flipped in the object of models/model.pt in a DVC remote.

DVC trusts a remote by default (`verify = false`, see tests/test_remotes.py), so a fresh clone's
`dvc pull` checks the damaged file out without a word and `dvc status` calls it up to date. Before,
evaluate then exited 0 with other numbers; now every stage that loads the model compares model.pt
with the SHA-256 that models/model.json records and stops with one line.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import run_stage
from dvc_helpers import copy_project, dvc, dvc_json, finished_project, git, md5_file

# slow (scratch repositories, DVC, several processes, kills): `make test-all`, not `make test`
pytestmark = pytest.mark.integration


def stage_command(project: Path, stage: str) -> list[str]:
    """The stage's command line as dvc.yaml gives it, without `python -m stages.`."""
    cmd = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], cmd
    return words[2:]


def test_a_model_corrupted_in_the_remote_stops_evaluate_with_one_line(tmp_path_factory, tmp_path):
    a = copy_project(finished_project(tmp_path_factory)[0], tmp_path / "A")
    remote = tmp_path / "remote"
    dvc(a, "remote", "add", "-d", "shared", str(remote))
    git(a, "commit", "-qam", "remote")
    dvc(a, "push")
    digest = md5_file(a / "models" / "model.pt")
    obj = remote / "files" / "md5" / digest[:2] / digest[2:]
    data = bytearray(obj.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))

    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", a, b)
    dvc(b, "pull")
    assert md5_file(b / "models" / "model.pt") != digest, "the damaged bytes reached the clone"
    assert dvc_json(b, "status") == {}  # DVC sees nothing wrong

    proc = run_stage(*stage_command(b, "evaluate"), cwd=b)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: models/model.pt: its SHA-256 "), proc.stderr
    assert "models/model.json records" in lines[0] and "dvc repro finetune" in lines[0], lines[0]
