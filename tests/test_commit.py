"""A stage's outs are replaced as a set, whatever kills the process, and each out is locked for every
process on the machine (issue 20, items 6 and 7).

The kill tests run a driver process (tests/commit_driver.py) that forks one child per kill point:
the child commits a new set of outs (plots/train, models, metrics/train.json) and dies by os._exit
(no cleanup, like SIGKILL) at its N-th filesystem step (a rename, unlink or rmdir), for N = 0, 1, 2,
... until the commit completes. A fresh child then runs the next stage start (lock_outputs, or
atomic_outputs entered and abandoned); after it the outs must be the old set or the new set, with
no temporaries, backups or journals left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT

from cnnlens import files
from cnnlens.errors import StageError

DRIVER = Path(__file__).with_name("commit_driver.py")


def sweep(tmp_path, how: str, had_old: bool = True, outs: str = "three") -> list[dict]:
    """One row per kill point (see commit_driver.py)."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path / "project"), how, str(int(had_old)), outs],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def broken(rows: list[dict], had_old: bool) -> list[str]:
    """The rows where the next start did not leave one whole set and nothing else."""
    bad = []
    for row in rows:
        n = len(row["versions"])
        sets = [["new"] * n, ["old"] * n if had_old else [None] * n]
        leftovers = [
            name for name in row["names"] if name not in ("plots/train", "models", "metrics/train.json")
        ]
        if row["recover_rc"] != 0 or row["versions"] not in sets or leftovers:
            bad.append(
                f"killed at step {row['at']} ({row['step']}): next start rc {row['recover_rc']}, "
                f"outs {row['versions']}, leftovers {leftovers} {row['recover_err'][-300:]}"
            )
    return bad


@pytest.mark.parametrize("had_old", [True, False], ids=["replacing", "first-run"])
def test_a_kill_at_any_step_of_a_commit_leaves_one_set(tmp_path, had_old):
    rows = sweep(tmp_path, "kill", had_old)
    assert len(rows) >= 6, rows  # every rename of the three outs was a kill point
    assert rows[-1]["rc"] == 0 and rows[-1]["versions"] == ["new"] * 3  # the last child was not killed
    assert not broken(rows, had_old), "\n".join(broken(rows, had_old))
    assert {row["recover_mode"] for row in rows} == {"lock", "enter"}


def test_a_kill_while_replacing_one_folder_keeps_it(tmp_path):
    """One out, a folder: its old version is moved aside before the new one goes in; a kill between
    the two renames must not lose it (the stale-temporary clean-up used to delete the backup)."""
    rows = sweep(tmp_path, "kill", outs="one")
    assert not broken(rows, True), "\n".join(broken(rows, True))


def test_a_failed_rename_is_undone_at_any_step(tmp_path):
    """An OSError at step N: the process undoes the renames itself and exits with an error."""
    rows = sweep(tmp_path, "fail")
    assert not broken(rows, True), "\n".join(broken(rows, True))
    assert all(row["rc"] in (0, 1) for row in rows), rows


def test_system_exit_at_any_step_is_undone(tmp_path):
    rows = sweep(tmp_path, "exit")
    assert not broken(rows, True), "\n".join(broken(rows, True))


def test_a_kill_while_undoing_a_failed_rename_leaves_one_set(tmp_path):
    """The rename of the new metrics file fails (read-only disk); the process is killed at each
    step of its undo and cleanup."""
    rows = sweep(tmp_path, "fail-metrics-then-kill")
    assert len(rows) >= 3, rows
    assert not broken(rows, True), "\n".join(broken(rows, True))


def test_a_kill_while_recovering_leaves_one_set(tmp_path):
    """The next start itself is killed at each of its steps, for every kill point of the commit;
    the start after it still leaves one set."""
    rows = sweep(tmp_path, "kill-recovery")
    assert not broken(rows, True), "\n".join(broken(rows, True))
    assert any(row["recover_kills"] > 0 for row in rows), rows


def test_an_unreadable_journal_is_one_line(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (tmp_path / ".models.journal").write_text("{not json")
    try:
        with pytest.raises(StageError) as err:
            files.lock_outputs(out)
    finally:
        files.release_locks()
    line = str(err.value)
    assert ".models.journal" in line and "delete" in line and "\n" not in line, line


# ---------------------------------------------------------------------------------------------
# locks: beside the out, whatever the TMPDIR

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cnnlens import files
    files.lock_outputs(*sys.argv[1:])
    print("locked", flush=True)
    time.sleep(120)
    """
)

ATOMIC = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cnnlens import files
    with files.atomic_outputs(sys.argv[1]) as (tmp,):
        tmp.mkdir()
        (tmp / "a.txt").write_text(sys.argv[2])
        print(tmp, flush=True)
        sys.stdin.readline()  # wait for the go
    print("committed", flush=True)
    """
)

TRY_LOCK = textwrap.dedent(
    """
    import sys
    from cnnlens import files
    from cnnlens.cli import run_main
    run_main(lambda argv: files.lock_outputs(*argv), sys.argv[1:])
    """
)


def python(code: str, *args, tmpdir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)}
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], env=env, text=True, cwd=ROOT, **kwargs
    )


def test_the_lock_holds_across_different_tmpdirs(tmp_path):
    out = tmp_path / "models"
    first = python(HOLD, out, tmpdir=tmp_path / "tmp1", stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = python(TRY_LOCK, out, tmpdir=tmp_path / "tmp2", stderr=subprocess.PIPE)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1 and "Traceback" not in err, err
        assert str(out) in err and "another running stage" in err and str(first.pid) in err, err
        assert (tmp_path / ".models.lock").read_text().strip() == str(first.pid)
    finally:
        first.kill()
        first.wait()
    assert list((tmp_path / "tmp1").iterdir()) == [] and list((tmp_path / "tmp2").iterdir()) == []


def test_a_live_temporary_is_never_removed_as_stale(tmp_path):
    """A second writer of the same out (another TMPDIR) must not delete the first one's temporary."""
    out = tmp_path / "plots"
    first = python(
        ATOMIC, out, "first", tmpdir=tmp_path / "tmp1", stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        live = Path(first.stdout.readline().strip())
        assert (live / "a.txt").read_text() == "first"
        second = python(
            ATOMIC,
            out,
            "second",
            tmpdir=tmp_path / "tmp2",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = second.communicate("go\n", timeout=60)
        assert (live / "a.txt").exists(), "the live temporary was removed"
        assert second.returncode != 0 and "another running stage" in err, err
        stdout, _ = first.communicate("go\n", timeout=60)
        assert first.returncode == 0 and "committed" in stdout
    finally:
        first.kill()
        first.wait()
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "tmp1", "tmp2"]


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(tmp_path):
    out = tmp_path / "models"
    first = python(HOLD, out, tmpdir=tmp_path / "tmp1", stdout=subprocess.PIPE)
    assert first.stdout.readline().strip() == "locked"
    first.kill()
    first.wait()
    assert (tmp_path / ".models.lock").exists()  # SIGKILL: the file stays, the kernel dropped the lock
    second = python(TRY_LOCK, out, tmpdir=tmp_path / "tmp2", stderr=subprocess.PIPE)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert not (tmp_path / ".models.lock").exists()  # removed at a normal exit


def test_lock_files_sit_beside_the_out_outside_it(tmp_path):
    outs = [tmp_path / "models", tmp_path / "plots" / "train", tmp_path / "metrics" / "train.json"]
    try:
        files.lock_outputs(*outs)
        assert files.lock_path(outs[1]) == tmp_path / "plots" / ".train.lock"
        for out in outs:
            lock = files.lock_path(out)
            assert lock.exists() and lock.parent == out.parent and lock.name == f".{out.name}.lock"
            assert lock.read_text().strip() == str(os.getpid())
        with files.atomic_outputs(*outs) as tmps:  # the holder itself may write them
            tmps[0].mkdir()
            tmps[1].mkdir()
            tmps[2].write_text("{}")
    finally:
        files.release_locks()
    assert not any(files.lock_path(out).exists() for out in outs)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "metrics",
        "models",
        "plots",
        "train",
        "train.json",
    ]


def test_the_same_out_by_two_spellings_is_one_lock(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    monkeypatch.chdir(tmp_path)
    assert files.lock_path("link/models") == files.lock_path(tmp_path / "real" / "models")
    assert files.lock_path("real/models") == tmp_path / "real" / ".models.lock"


def test_write_json_leaves_no_lock_file(tmp_path):
    start = time.monotonic()
    for i in range(50):
        files.write_json(tmp_path / "m.json", {"i": i})
    assert time.monotonic() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_command_freezes_the_garbage_collector_at_exit(tmp_path):
    """run_main registers gc.freeze at exit, so the interpreter's last collections skip the objects torch
    created (0.3-0.4 s of every stage's exit); atexit runs the hooks last registered first, so a hook
    registered before run_main sees the frozen count."""
    code = textwrap.dedent(
        """
        import atexit, gc, sys
        atexit.register(lambda: print("frozen", gc.get_freeze_count(), file=sys.stderr))
        from cnnlens.cli import run_main
        import torch
        run_main(lambda argv: None)
        run_main(lambda argv: None, [])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    frozen = [int(line.split()[1]) for line in run.stderr.splitlines() if line.startswith("frozen")]
    assert len(frozen) == 1 and frozen[0] > 10_000, run.stderr  # torch alone: several 10^5 objects


def test_a_stage_imports_without_the_collector_and_runs_with_it(tmp_path):
    """`python -m stages.X`: the stage's imports run with the garbage collector off (stages/__init__.py),
    its main with it on and the imported objects frozen (run_main); importing stages otherwise changes
    nothing. stages/__init__.py knows `python -m` by the sys.argv runpy sets while it imports the package."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("import sys\nprint('argv0', sys.argv[0])\n")
    (tmp_path / "pkg/mod.py").write_text("")
    run = subprocess.run([sys.executable, "-m", "pkg.mod"], cwd=tmp_path, capture_output=True, text=True)
    assert run.stdout == "argv0 -m\n", run.stdout + run.stderr
    as_stage = textwrap.dedent(
        """
        import sys
        sys.argv = ["-m"]
        import gc, stages
        print("import", gc.isenabled())
        from cnnlens.cli import run_main
        run_main(lambda argv: print("main", gc.isenabled(), gc.get_freeze_count() > 0))
        """
    )
    imported = "import gc, stages\nprint('import', gc.isenabled())\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        for code in (as_stage, imported)
    ]
    assert outs == ["import False\nmain True True\n", "import True\n"]
