"""Team sharing through DVC remotes: clone A runs the pipeline and pushes data + run-cache, a fresh
`git clone` B pulls and has nothing left to run. One scenario per remote kind (a local directory,
S3 served by moto on 127.0.0.1, a real sshd on 127.0.0.1); a teammate reusing a run that A pushed
but never committed (local directory and S3): B runs no stage; what DVC 3.67 does with the
run-cache on a clone without dvc.lock and with a corrupted object in the remote.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dvc_helpers import (
    copy_project,
    dvc,
    dvc_json,
    dvc_yaml_stages,
    finished_project,
    free_port,
    git,
    md5_file,
    metrics_files,
    set_params,
    stage_report,
    wait_for_port,
)

# slow (scratch repositories, DVC, several processes, kills): `make test-all`, not `make test`
pytestmark = pytest.mark.integration

STAGES = dvc_yaml_stages()
DOWNSTREAM_OF_MODEL = {"finetune", "evaluate", "saliency", "activations", "export"}


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    return finished_project(tmp_path_factory)


@pytest.fixture
def clone_a(finished, tmp_path):
    return copy_project(finished[0], tmp_path / "A")


def tracked_outputs(project: Path) -> dict[str, str]:
    """{relative path: md5} of every file under the DVC-tracked outputs and of the metrics."""
    out = {}
    for top in ("data/raw", "data/weights", "data/prepared", "models", "plots"):
        for f in sorted((project / top).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(project))] = md5_file(f)
    for name in metrics_files(project):
        if (project / name).exists():
            out[name] = md5_file(project / name)
    return out


def add_remote(a: Path, remote_args: list[list[str]], local_config: list[list[str]]) -> None:
    """The remote in .dvc/config (committed), its credentials in .dvc/config.local."""
    for args in remote_args:
        dvc(a, "remote", *args)
    for args in local_config:
        dvc(a, "remote", "modify", "--local", *args)
    git(a, "add", ".dvc/config")
    git(a, "commit", "-qm", "remote")


def share(a: Path, b: Path, remote_args: list[list[str]], local_config: list[list[str]]) -> str:
    """A: configure the remote (committed) and its credentials (--local), `dvc push --run-cache`.
    B: `git clone` A, the same --local settings, `dvc pull --run-cache`, `dvc repro`. Returns B's repro output."""
    add_remote(a, remote_args, local_config)
    pushed = dvc(a, "push", "--run-cache").stdout
    assert "pushed" in pushed, pushed

    git(b.parent, "clone", "-q", a, b)
    assert (b / "dvc.lock").read_bytes() == (a / "dvc.lock").read_bytes()
    assert not (b / "models").exists(), "a git clone has no data until it pulls"
    for args in local_config:
        dvc(b, "remote", "modify", "--local", *args)
    dvc(b, "pull", "--run-cache")
    out = dvc(b, "repro").stdout
    report = stage_report(out)
    assert report["ran"] == set() and report["restored"] == set(), out
    assert report["skipped"] == set(STAGES), out
    assert dvc_json(b, "status") == {}
    assert tracked_outputs(b) == tracked_outputs(a)
    for name in metrics_files(a):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    return out


def remote_objects(root: Path) -> tuple[int, int]:
    """(data objects, run-cache entries) stored under a remote directory."""
    count = lambda d: sum(1 for f in (root / d).rglob("*") if f.is_file()) if (root / d).is_dir() else 0
    return count("files"), count("runs")


def test_share_through_a_local_directory_remote(clone_a, tmp_path):
    remote = tmp_path / "remote"
    share(clone_a, tmp_path / "B", [["add", "-d", "shared", str(remote)]], [])
    objects, runs = remote_objects(remote)
    assert objects > 0 and runs == len(STAGES), (objects, runs)


# --- a teammate reuses a run that was pushed but never committed -------------------------------------

EDIT = {"train.loss": "bce_with_logits"}


def reuse_uncommitted_run(a: Path, b: Path, local_config: list[list[str]], with_exp: bool) -> None:
    """A (remote configured and committed, the committed run pushed) edits train.loss, runs it and
    pushes with --run-cache, committing nothing. B clones the same commit and asks for the same
    edit: every stage is restored or pulled, none runs, and B ends with A's outputs, metrics, plots
    and dvc.lock byte for byte.
    with_exp: A `dvc exp run -S`, B `dvc exp run -S ... --pull`; otherwise both edit params.yaml,
    A runs `dvc repro`, B `dvc pull --run-cache` then `dvc repro --pull`."""
    dvc(a, "push")  # the committed run, as its author pushed it (step 3)
    committed = git(a, "rev-parse", "HEAD").stdout
    override = ["-S", "=".join(*EDIT.items())]
    if not with_exp:
        set_params(a, **EDIT)
    ran = stage_report(dvc(a, "exp", "run", *override).stdout if with_exp else dvc(a, "repro").stdout)
    assert ran["ran"] == DOWNSTREAM_OF_MODEL, ran
    dvc(a, "push", "--run-cache")
    assert git(a, "rev-parse", "HEAD").stdout == committed
    assert set(git(a, "status", "--porcelain").stdout.split()) == {"M", "params.yaml", "dvc.lock"}

    git(b.parent, "clone", "-q", a, b)
    for args in local_config:
        dvc(b, "remote", "modify", "--local", *args)
    if with_exp:
        out = dvc(b, "exp", "run", *override, "--pull").stdout
    else:
        set_params(b, **EDIT)
        dvc(b, "pull", "--run-cache")
        assert any((b / ".dvc/cache/runs").rglob("*")), "the run-cache entries came down"
        # DVC 3.67's `pull --run-cache` fetches the entries but not the objects of A's new
        # outputs (only those of the committed dvc.lock); `repro --pull` fetches them per stage
        lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
        model = next(o["md5"] for o in lock["finetune"]["outs"] if o["path"] == "models")
        assert not (b / ".dvc/cache/files/md5" / model[:2] / model[2:]).exists()
        out = dvc(b, "repro", "--pull").stdout
    report = stage_report(out)
    assert report["ran"] == set(), out
    assert report["restored"] == DOWNSTREAM_OF_MODEL, out
    assert report["pulled"] | report["skipped"] == set(STAGES) - DOWNSTREAM_OF_MODEL, out
    assert dvc_json(b, "status") == {}
    assert (b / "dvc.lock").read_bytes() == (a / "dvc.lock").read_bytes()
    outputs = tracked_outputs(a)
    assert tracked_outputs(b) == outputs
    assert {"metrics/train.json", "metrics/eval.json", "plots/train/metrics.json"} <= set(outputs)
    assert any(k.startswith("plots/train/plots/metrics/") for k in outputs), "DVCLive's plots"
    assert json.loads((b / "models/model.json").read_text())["loss"] == EDIT["train.loss"]
    # metrics diff against the commit: the committed run's metrics come from the cache or the remote
    diff = dvc_json(b, "metrics", "diff")
    assert diff == dvc_json(a, "metrics", "diff")
    assert "best_val_acc" in diff["metrics/train.json"] or "total_seconds" in diff["metrics/train.json"], diff


def test_teammate_reuses_an_uncommitted_run_through_a_local_directory_remote(clone_a, tmp_path):
    add_remote(clone_a, [["add", "-d", "shared", str(tmp_path / "remote")]], [])
    reuse_uncommitted_run(clone_a, tmp_path / "B", [], with_exp=True)


# --- S3 (moto) -------------------------------------------------------------------------------------


@pytest.fixture
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is not installed (requirements-dev.txt has it)")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing-secret",
        )
        client.create_bucket(Bucket="team-bucket")
        yield url, client
    finally:
        server.stop()


def test_share_through_an_s3_remote(clone_a, tmp_path, s3_server):
    url, client = s3_server
    share(
        clone_a,
        tmp_path / "B",
        [["add", "-d", "s3", "s3://team-bucket/hymenoptera"], ["modify", "s3", "endpointurl", url]],
        [["s3", "access_key_id", "testing"], ["s3", "secret_access_key", "testing-secret"]],
    )
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="team-bucket")
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("hymenoptera/files/md5/") for k in keys)
    assert sum(k.startswith("hymenoptera/runs/") for k in keys) == len(STAGES)
    # the secret lives only in the untracked .dvc/config.local
    committed = git(clone_a, "show", "HEAD:.dvc/config").stdout
    assert url in committed and "testing-secret" not in committed
    assert "testing-secret" in (clone_a / ".dvc" / "config.local").read_text()
    assert git(clone_a, "check-ignore", "-q", ".dvc/config.local", check=False).returncode == 0


def test_teammate_reuses_an_uncommitted_run_through_an_s3_remote(clone_a, tmp_path, s3_server):
    url, _ = s3_server
    local = [["s3", "access_key_id", "testing"], ["s3", "secret_access_key", "testing-secret"]]
    add_remote(
        clone_a,
        [["add", "-d", "s3", "s3://team-bucket/hymenoptera"], ["modify", "s3", "endpointurl", url]],
        local,
    )
    reuse_uncommitted_run(clone_a, tmp_path / "B", local, with_exp=False)


# --- SSH (a real sshd) -----------------------------------------------------------------------------

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)), None)


@pytest.fixture
def sshd(tmp_path):
    if SSHD is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh-keygen not installed (apt-get install openssh-server; .ci/run does)")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege-separation directory
    if not privsep.is_dir():
        try:
            privsep.mkdir(mode=0o755, parents=True)
        except OSError as exc:
            pytest.skip(f"sshd needs {privsep} and it cannot be created here: {exc}")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dvc-test", "-f", d / key], check=True
        )
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", d / "sshd_config"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield port, d / "user_key", d / "sshd.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_share_through_an_ssh_remote(clone_a, tmp_path, sshd):
    port, key, log = sshd
    remote = tmp_path / "ssh-remote"
    share(
        clone_a,
        tmp_path / "B",
        [["add", "-d", "ssh", f"ssh://{getpass.getuser()}@127.0.0.1:{port}{remote}"]],
        [["ssh", "keyfile", str(key)]],
    )
    objects, runs = remote_objects(remote)
    assert objects > 0 and runs == len(STAGES), (objects, runs)
    assert "Accepted publickey" in log.read_text(), "the transfers went through the test's sshd"


# --- run-cache on a clone without dvc.lock ---------------------------------------------------------


def test_run_cache_on_a_clone_without_lock_restores_every_stage(clone_a, tmp_path):
    """B checks out the commit before the run (no dvc.lock, no metrics). `dvc repro --pull` fetches the
    run-cache and restores a stage instead of running it when all its outputs are in the remote.
    The metrics are cached outputs (not `cache: false`, which DVC never pushes), so that is every stage."""
    remote = tmp_path / "remote"
    dvc(clone_a, "remote", "add", "-d", "shared", str(remote))
    dvc(clone_a, "push", "--run-cache")
    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", clone_a, b)
    git(b, "checkout", "-q", "HEAD~1")  # "tiny params": code and params, before the run
    assert not (b / "dvc.lock").exists()
    dvc(b, "remote", "add", "-d", "shared", str(remote))
    pulled = dvc(b, "pull", "--run-cache", check=False)
    assert pulled.returncode != 0 and "Checkout failed" in pulled.stdout, (
        "nothing to check out without dvc.lock"
    )

    out = dvc(b, "repro", "--pull").stdout
    report = stage_report(out)
    assert report["restored"] == set(STAGES), out
    assert report["ran"] == set(), out
    assert tracked_outputs(b) == tracked_outputs(clone_a)
    assert dvc_json(b, "status") == {}


# --- a corrupted object in the remote --------------------------------------------------------------


@pytest.fixture
def corrupted_remote(clone_a, tmp_path):
    """A local remote holding everything A pushed, with the object of data/prepared/classes.json
    overwritten by other bytes (a bit-rotted or tampered file). Returns (remote, good bytes, bad bytes)."""
    remote = tmp_path / "remote"
    dvc(clone_a, "remote", "add", "-d", "shared", str(remote))
    git(clone_a, "commit", "-qam", "remote")
    dvc(clone_a, "push")
    good = (clone_a / "data/prepared/classes.json").read_bytes()
    digest = md5_file(clone_a / "data/prepared/classes.json")
    obj = remote / "files" / "md5" / digest[:2] / digest[2:]
    assert obj.read_bytes() == good
    bad = good.replace(b"bees", b"wasps")
    assert bad != good
    obj.chmod(0o644)
    obj.write_bytes(bad)
    return remote, good, bad, digest


def cache_object(project: Path, digest: str) -> Path:
    return project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]


def test_corrupted_remote_object_is_rejected_with_verify(clone_a, corrupted_remote, tmp_path):
    """`verify = true` on the remote: DVC re-hashes what it downloads and drops what does not match."""
    _, good, bad, digest = corrupted_remote
    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", clone_a, b)
    dvc(b, "remote", "modify", "--local", "shared", "verify", "true")
    pulled = dvc(b, "pull", check=False)
    assert pulled.returncode != 0, pulled.stdout
    assert "Checkout failed" in pulled.stdout and "data/prepared" in pulled.stdout, pulled.stdout
    assert not (b / "data/prepared").exists(), "the output with the bad object is not checked out"
    assert not cache_object(b, digest).exists(), "the corrupted download is not kept in the cache"
    assert md5_file(b / "models/model.pt") == md5_file(clone_a / "models/model.pt"), "the rest is pulled"

    # a clone that already has the good file: pull keeps it; status flags the missing cache object
    c = copy_project(clone_a, tmp_path / "C")
    shutil.rmtree(c / ".dvc" / "cache")
    dvc(c, "remote", "modify", "--local", "shared", "verify", "true")
    dvc(c, "pull")  # exits 0: only a DEBUG line says "corrupted cache file"
    assert (c / "data/prepared/classes.json").read_bytes() == good
    assert not cache_object(c, digest).exists()
    assert dvc_json(c, "status") == {"prepare": [{"changed outs": {"data/prepared": "not in cache"}}]}


def test_corrupted_remote_object_passes_unnoticed_without_verify(clone_a, corrupted_remote, tmp_path):
    """The default (`verify = false`): DVC trusts the remote; the bad bytes reach the workspace and
    `dvc status` calls it up to date. This is why the README asks for `verify true` on shared remotes."""
    _, good, bad, digest = corrupted_remote
    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", clone_a, b)
    dvc(b, "pull")
    assert (b / "data/prepared/classes.json").read_bytes() == bad
    assert cache_object(b, digest).read_bytes() == bad
    assert dvc_json(b, "status") == {}


def test_repairing_a_corrupted_remote_object_needs_its_dir_listing_removed_too(clone_a, corrupted_remote):
    """`dvc push` from a clone with the good copy does not overwrite a corrupted object, and does not
    re-upload a deleted one while the output's .dir listing is still in the remote; deleting both does."""
    remote, good, bad, digest = corrupted_remote
    obj = remote / "files" / "md5" / digest[:2] / digest[2:]
    assert "Everything is up to date" in dvc(clone_a, "push").stdout
    assert obj.read_bytes() == bad
    obj.unlink()
    assert "Everything is up to date" in dvc(clone_a, "push").stdout
    assert not obj.exists()
    lock = yaml.safe_load((clone_a / "dvc.lock").read_text())
    listing = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    (remote / "files" / "md5" / listing[:2] / listing[2:]).unlink()
    dvc(clone_a, "push")
    assert obj.read_bytes() == good
