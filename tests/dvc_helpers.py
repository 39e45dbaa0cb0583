"""Helpers for the DVC tests: a scratch copy of the project, running DVC in it, reading its reports.

DVC never runs in the real working tree. `finished_project()` copies the tree (like scripts/demo.sh),
applies TINY params, commits, runs `dvc repro` once per test session; each test then works on its
own `copy_project()` of that finished project (with .git and .dvc/cache), so the expensive run
happens once however many tests (or test files) use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Tiny synthetic pipeline: every stage runs, in seconds. Counts/sizes are the smallest that keep
# every stage meaningful (both classes in train and val, crop < resize < image size).
TINY = {
    "data": {
        "source": "synthetic",
        "synthetic": {"image_size": 48, "train_ants": 12, "train_bees": 12, "val_ants": 8, "val_bees": 8},
    },
    "model": {"weights": "none"},
    "prepare": {"resize": 40},
    "train": {"epochs": 3, "batch_size": 8, "crop": 32, "min_scale": 0.5, "device": "cpu", "threads": 1},
    "evaluate": {"gallery_max": 4, "device": "cpu"},
    "saliency": {
        "num_images": 2,
        "quality_images": 4,
        "smoothgrad_samples": 2,
        "ig_steps": 4,
        "quality_steps": 4,
        "bootstrap": 50,
        "methods": ["gradient", "gradcam"],
        "batch_size": 4,
        "device": "cpu",
    },
    "activations": {"num_images": 1, "max_maps": 8, "device": "cpu"},
}

_RAN = re.compile(r"^Running stage '([^']+)'", re.M)
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.M)
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs", re.M)
_PULLED = re.compile(r"^Pulling data for stage: '([^']+)'", re.M)  # `dvc repro --pull`, unchanged stage


def dvc_yaml_stages(project: Path = ROOT) -> list[str]:
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def metrics_files(project: Path = ROOT) -> list[str]:
    """The metrics files dvc.yaml declares (cached outputs like the rest: git-ignored, in the remote)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return [
        next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])
    ]


def dvc_env(**extra) -> dict:
    """The environment DVC runs in: the venv first on PATH (stage commands say `python`), no
    analytics, no user/system DVC config, one BLAS/OpenMP thread (2 shared cores: more threads only
    contend), git identity (conftest sets it in os.environ)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # stages must import from the scratch copy, not from the real tree
    scratch = _isolation_dir()
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="1",
        DVC_GLOBAL_CONFIG_DIR=str(scratch / "global"),
        DVC_SYSTEM_CONFIG_DIR=str(scratch / "system"),
        DVC_SITE_CACHE_DIR=str(scratch / "site"),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        AWS_EC2_METADATA_DISABLED="true",
        GIT_TERMINAL_PROMPT="0",
    )
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        env.setdefault(key, "test" if key.endswith("NAME") else "test@localhost")
    env.update(extra)
    return env


_ISOLATION: list[Path] = []


def _isolation_dir() -> Path:
    """Empty global/system DVC config dirs and a private site cache, so no user setting leaks in."""
    if not _ISOLATION:
        _ISOLATION.append(Path(tempfile.mkdtemp(prefix="dvc-test-config-")))
    scratch = _ISOLATION[0]
    for sub in ("global", "system", "site"):
        (scratch / sub).mkdir(exist_ok=True)
    return scratch


def sh(
    cwd: Path, *cmd, check: bool = True, timeout: float = 600, env: dict | None = None, merge: bool = True
) -> subprocess.CompletedProcess:
    """Run a command. merge: stdout and stderr together in `.stdout`, in order (DVC logs info to
    stdout and warnings/errors to stderr); otherwise apart (for --json output)."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"`{' '.join(map(str, cmd))}` in {cwd} exited {proc.returncode}:\n"
            f"{proc.stdout[-6000:]}{proc.stderr[-3000:] if proc.stderr else ''}"
        )
    return proc


def dvc(cwd: Path, *args, **kw) -> subprocess.CompletedProcess:
    return sh(cwd, "dvc", *args, **kw)


def dvc_json(cwd: Path, *args):
    """`dvc ARGS --json`, parsed (warnings on stderr are left out)."""
    return json.loads(sh(cwd, "dvc", *args, "--json", merge=False).stdout)


def git(cwd: Path, *args, **kw) -> subprocess.CompletedProcess:
    return sh(cwd, "git", *args, **kw)


def stage_report(output: str) -> dict[str, set[str]]:
    """What `dvc repro`/`dvc exp run` says it did with each stage."""
    return {
        "ran": set(_RAN.findall(output)),
        "skipped": set(_SKIPPED.findall(output)),
        "restored": set(_RESTORED.findall(output)),
        "pulled": set(_PULLED.findall(output)),
    }


def scratch_tree(dst: Path) -> Path:
    """Copy the working tree's tracked and untracked-not-ignored files that exist (as scripts/demo.sh)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dst.mkdir(parents=True)
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def write_tiny_params(project: Path, overrides: dict = TINY) -> None:
    """params.yaml = the project's params.yaml + `overrides`, through the same CLI `make demo` uses."""
    over = project.parent / f"{project.name}-overrides.yaml"
    over.write_text(yaml.safe_dump(overrides, sort_keys=False))
    sh(project, "python", "-m", "cnnlens.config", "merge", "params.yaml", over, "-o", "params.yaml")


def set_params(project: Path, **dotted) -> None:
    """Edit params.yaml in place, e.g. set_params(p, **{"train.loss": "focal"}) (yaml round trip)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        assert leaf in node, f"{key} is not in params.yaml"
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


_FINISHED: dict[str, object] = {}


def finished_project(tmp_path_factory) -> tuple[Path, str]:
    """(path, output of the full `dvc repro`) of the once-per-session finished tiny project.

    Git history of the copy: commit "tiny params" (code + params, no dvc.lock), then commit
    "pipeline run" (dvc.lock and the .gitignore files; the metrics are cached outputs, not in git).
    """
    if "error" in _FINISHED:  # fail every later test fast instead of rebuilding
        raise AssertionError(f"building the finished project failed earlier:\n{_FINISHED['error']}")
    if "path" not in _FINISHED:
        base = tmp_path_factory.mktemp("dvc-finished")
        if not _ISOLATION:
            _ISOLATION.append(base / "dvc-config")
            _ISOLATION[0].mkdir()
        try:
            project = scratch_tree(base / "project")
            write_tiny_params(project)
            git(project, "init", "-q", "-b", "main")
            git(project, "add", "-A")
            git(project, "commit", "-qm", "tiny params")
            out = dvc(project, "repro").stdout
            git(project, "add", "-A")
            git(project, "commit", "-qm", "pipeline run")
        except Exception as exc:
            _FINISHED["error"] = str(exc)[-6000:]
            raise
        _FINISHED.update(path=project, output=out)
    return _FINISHED["path"], _FINISHED["output"]


def copy_project(src: Path, dst: Path) -> Path:
    """A full independent copy (workspace, .git, .dvc/cache); symlinks stay symlinks."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
