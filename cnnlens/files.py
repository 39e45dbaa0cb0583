"""Disk helpers shared by all stages: atomic writes, JSON, CSV tables, checksums, safe torch loads.

Every output a stage declares in dvc.yaml is written to a temporary sibling first and renamed
into place only when complete, so a killed stage never leaves a half-written file that DVC
could cache as done. Several outs are replaced as a set: a journal beside each out lists the
renames before the first one, so the next run that writes or locks those outs finishes (or,
if the renames had not begun, drops) a commit that a kill cut short. Each out has a lock file
beside it (`.<name>.lock`), seen by every process on the machine whatever its TMPDIR.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import glob
import hashlib
import io
import json
import numbers
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from cnnlens.errors import StageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    Works for files and directories: the caller creates whatever it wants at the yielded path.
    On any exception the temporary is removed and `path` is left as it was.
    """
    with atomic_outputs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of `paths`; when the block succeeds, rename them all
    into place in the order given (put the metrics file last), or, if any rename fails, put every
    old out back. A stage's outs are thus replaced together or not at all, even when the process
    is killed during the renames (see _commit).

    On entry each out is locked (another process writing it is an error), a commit of these outs
    that a killed run left unfinished is finished or undone, and that run's temporaries are removed.
    The temporaries are reserved on entry, so a read-only or missing folder fails before any work
    is written. On any exception every temporary is removed and every `path` is left as it was.
    """
    paths = [Path(p) for p in paths]
    keys = _hold(paths)
    tmps: list[Path] = []
    try:
        _tidy(paths)
        for path in paths:
            try:
                tmps.append(_reserve(path))
            except OSError as exc:  # name the out, not its temporary
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
        try:
            yield tmps
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            # a failed write() names no file: name the folders the outs were being written in
            where = ", ".join(dict.fromkeys(str(p.parent) for p in paths))
            raise OSError(exc.errno, exc.strerror, f"a file under {where}") from exc
        for path, tmp in zip(paths, tmps):
            if not tmp.exists():
                raise StageError(f"internal error: nothing was written for {path}")
        _commit(paths, tmps)
    finally:
        _LIVE.difference_update(_absolute(t) for t in tmps)
        if not any(_journal(p).exists() for p in paths):  # else the next run needs them to finish
            for tmp in tmps:
                remove_path(tmp)
        for key in keys:
            _drop(key)


# temporaries this process is writing: never removed as stale, even by a nested atomic_outputs
_LIVE: set[Path] = set()


def _reserve(path: Path) -> Path:
    """A fresh temporary name beside `path` (created and removed: the caller makes a file or a dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()
    _LIVE.add(_absolute(tmp))
    return tmp


def _tidy(paths: list[Path]) -> None:
    """With the outs locked: finish or undo an interrupted commit, then remove the temporaries of
    killed runs. Their owners are gone: a live owner would hold the lock."""
    for path in paths:
        _recover(path)
    for path in paths:
        # exactly our names (mkdtemp adds 8 characters), not another out's (.x.json.*)
        mine = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(\.old\.tmp)?")
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if mine.fullmatch(stale.name) and _absolute(stale) not in _LIVE:
                remove_path(stale)


# ---------------------------------------------------------------------------------------------
# the commit: every kill point leaves a state the next run turns into the old or the new set
#
# 1. write the journal beside each out, first to last (each atomically: temporary, fsync, rename);
# 2. per out: rename the old out aside (<tmp>.old.tmp), rename the temporary onto the out;
# 3. remove the old outs; 4. remove the journals, first to last.
# A failed rename is undone in reverse order (each undo step again a state of step 2), then the
# journals are removed last to first, as when writing them fails.
# So the journals that exist are a prefix of the list (j1..jm) while no out has been touched or
# the undo is complete, and all of them or a suffix (jk..jn) once the renames may have begun.
# The next run that finds journal ji (_recover) rolls the whole set forward when every later
# journal exists (the temporaries not yet renamed are all there: their journals exist, so no run
# has removed them as stale), and otherwise drops the commit: removes the journals and temporaries.


def _commit(paths: list[Path], tmps: list[Path]) -> None:
    """Rename each tmp onto its path, all or none (see above); undo on failure."""
    if len(paths) == 1 and _replaces_atomically(paths[0], tmps[0]):
        os.replace(tmps[0], paths[0])
        return
    entries = [(_absolute(p), _absolute(t), _absolute(Path(f"{t}.old.tmp"))) for p, t in zip(paths, tmps)]
    journals = [_journal(p) for p in paths]
    try:
        for journal in journals:
            _write_journal(journal, entries)
    except BaseException:
        _remove_journals(journals[::-1], quiet=True)
        raise
    done: list[tuple[Path, Path]] = []
    try:
        for entry in entries:
            _install(entry, done)
    except BaseException:
        try:
            for src, dst in reversed(done):
                os.replace(dst, src)
        except OSError:
            pass  # the journals stay: the next run finishes the commit
        else:
            _remove_journals(journals[::-1], quiet=True)
        raise
    _finish(entries, journals)


def _replaces_atomically(path: Path, tmp: Path) -> bool:
    """One rename does it: no out yet, or a file (or link) replaced by a file."""
    is_dir = lambda p: p.is_dir() and not p.is_symlink()  # noqa: E731
    return not os.path.lexists(path) or not is_dir(path) and not is_dir(tmp)


def _install(entry: tuple[Path, Path, Path], done: list[tuple[Path, Path]]) -> None:
    """Move the old out aside (if any) and the temporary onto the out; record each rename in `done`."""
    path, tmp, old = entry
    if os.path.lexists(path):
        os.replace(path, old)
        done.append((path, old))
    os.replace(tmp, path)
    done.append((tmp, path))


def _finish(entries, journals) -> None:
    for folder in dict.fromkeys(path.parent for path, _, _ in entries):
        fsync_dir(folder)  # the renames reach the disk before the journals go
    for _, _, old in entries:
        remove_path(old)
    _remove_journals(journals)


def _recover(path: Path) -> None:
    """Finish or drop the commit that a journal beside `path` records (see above)."""
    journal = _journal(path)
    remove_path(journal.with_name(journal.name + ".tmp"))  # a journal whose writing was cut short
    if not journal.exists():
        return
    entries = _read_journal(journal, path)
    journals = [_journal(p) for p, _, _ in entries]
    keys = _hold([p for p, _, _ in entries])  # the other outs of the set too
    try:
        later = journals[journals.index(journal) + 1 :] if journal in journals else []
        if all(j.exists() for j in later):
            for entry in entries:
                if os.path.lexists(entry[1]):
                    _install(entry, [])
            _finish(entries, journals)
            what = "finished it: the new outs are in place"
        else:  # cut short while writing (or undoing): no out is touched
            _remove_journals(journals[::-1])
            for _, tmp, _ in entries:
                remove_path(tmp)
            what = "dropped it: the old outs stay"
    finally:
        for key in keys:
            _drop(key)
    names = ", ".join(_near(p) for p, _, _ in entries)
    print(f"{path}: an interrupted run left the replacement of {names} unfinished; {what}", file=sys.stderr)


def _near(path: Path) -> str:
    """`path` relative to the working folder when it is inside it (as a stage's command line has it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _absolute(path: Path) -> Path:
    """`path` made absolute through its real parent folder (the name itself may be a link)."""
    path = Path(path)
    return Path(os.path.abspath(path)).parent.resolve() / path.name


def _journal(path: Path) -> Path:
    path = _absolute(path)
    return path.with_name(f".{path.name}.journal")


def _write_journal(journal: Path, entries) -> None:
    doc = {"replace": [[os.path.relpath(p, journal.parent) for p in entry] for entry in entries]}
    tmp = journal.with_name(journal.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, journal)
    fsync_dir(journal.parent)


def _read_journal(journal: Path, path: Path) -> list[tuple[Path, Path, Path]]:
    try:
        entries = [
            tuple(_absolute(journal.parent / p) for p in e)
            for e in json.loads(journal.read_text())["replace"]
        ]
        if not entries or any(len(e) != 3 for e in entries):
            raise ValueError("no list of (out, temporary, backup)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"{journal}: cannot read this record of an interrupted replacement of {path} ({exc}); "
            f"check {path} and the .{path.name}.*.tmp files beside it by hand, then delete {journal} and rerun"
        ) from None
    return entries


def _remove_journals(journals: list[Path], quiet: bool = False) -> None:
    for journal in journals:
        try:
            remove_path(journal)
        except OSError:
            if not quiet:
                raise


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the filesystem can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every filesystem syncs a folder
        pass
    finally:
        os.close(fd)


def remove_path(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    # numpy scalars and arrays, Paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: str | os.PathLike, rows: list[dict], *, columns: list[str] | None = None) -> None:
    """`rows` as a table, one line per row: the bytes `pandas.DataFrame(rows, columns=columns).to_csv(path,
    index=False)` writes (tests/test_files.py checks it against pandas), without importing pandas, which
    costs a stage's process 0.15-0.2 s. The columns are `columns`, else every key in order of first
    appearance; see _csv_cells for the values. Quoting only where needed, "\n" line ends, UTF-8."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [_csv_cells([row.get(name) for row in rows]) for name in columns]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([column[i] for column in cells] for i in range(len(rows)))
    write_text(path, text.getvalue())


def _csv_cells(values: list) -> list[str]:
    """One column's cells as pandas writes them: missing values (None, NaN) empty; a column of numbers
    with a float or a missing value as one float array (1 -> 1.0), in numpy's shortest repr (0.1, 1e-05;
    float32 values as float32: 0.1, not 0.10000000149011612); anything else with str() (True, 3, text)."""
    import numpy as np  # not at the top: download imports this module and needs no numpy

    missing = [v is None or v != v for v in values]
    numeric = all(
        m or isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        for v, m in zip(values, missing)
    )
    if numeric and any(m or not isinstance(v, numbers.Integral) for v, m in zip(values, missing)):
        # None as NaN; a NaN stays itself, so float32 NaN keeps a float32 column float32
        cells = np.array([np.nan if v is None else v for v in values]).astype(str)
        return ["" if m else cell for cell, m in zip(cells.tolist(), missing)]
    return ["" if m else str(v) for v, m in zip(values, missing)]


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); delete it and rerun `dvc repro`") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save with its write errors made readable: torch reports a full disk as
    `RuntimeError: [enforce fail at inline_container.cc...] unexpected pos`, naming no file."""
    import torch

    try:
        torch.save(obj, path)
    except OSError:
        raise
    except RuntimeError as exc:
        free = shutil.disk_usage(Path(path).parent).free // 2**20
        raise StageError(
            f"cannot write {path}: torch.save failed ({str(exc).strip().splitlines()[0][:120]}); "
            f"{free} MiB free on that filesystem: free space (df -h) and rerun"
        ) from exc


def load_torch(path: str | os.PathLike, what: str = "file"):
    """torch.load with weights_only=True (no pickled code runs) and a clear error."""
    import torch

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: {what} not found; run the stage that writes it first (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise StageError(
            f"{path}: cannot load {what} ({type(exc).__name__}: {exc}); "
            "delete it and rerun the stage that writes it"
        ) from exc


def unique_stems(paths: list[str]) -> list[str]:
    """One file or folder name per manifest path: its stem, or the whole path when two stems collide."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else p.replace("/", "_").rsplit(".", 1)[0] for s, p in zip(stems, paths)]


# ---------------------------------------------------------------------------------------------
# locks: `<folder>/.<name>.lock` beside each out, an flock the kernel drops when the process dies


@dataclass
class _Lock:
    file: IO
    pid: int  # the process that took it (a forked child must not remove it)
    users: int = 1  # atomic_outputs blocks holding it, plus one for good after lock_outputs


_LOCKS: dict[Path, _Lock] = {}  # the lock files this process holds


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of `out`: a dotfile beside it (outside the out, seen by every process)."""
    out = _absolute(Path(out))
    return out.with_name(f".{out.name}.lock")


def lock_outputs(*outs: str | os.PathLike) -> None:
    """Lock each out for the rest of the process (a file beside it, see lock_path), then finish or
    undo a replacement of these outs that a killed run left unfinished and remove its temporaries.

    A second copy of the stage (e.g. a new `dvc repro` beside an orphan, in any TMPDIR) fails at
    once with one line naming the out and the pid that holds it.
    """
    paths = [Path(o) for o in outs]
    _hold(paths)  # never dropped: held until the process exits
    _tidy(paths)


def release_locks() -> None:
    """Release every lock this process holds and remove its lock files (done at exit)."""
    for key in list(_LOCKS):
        _release(key)


def _hold(outs: list[Path]) -> list[Path]:
    """Lock each out (or count one more user of a lock already held); all or none."""
    keys: list[Path] = []
    try:
        for out in outs:
            keys.append(_acquire(out))
    except BaseException:
        for key in keys:
            _drop(key)
        raise
    return keys


def _acquire(out: Path) -> Path:
    import fcntl

    key = lock_path(out)
    if key in _LOCKS:
        _LOCKS[key].users += 1
        return key
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(key, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                fh.close()
                raise StageError(
                    f"{out} is being written by another running stage (pid {holder}); "
                    f"wait for it to finish or stop it (kill {holder}), then rerun"
                ) from None
            if _same_file(key, fh):
                break
            fh.close()  # its holder removed it as we opened it: lock the new one
    except OSError as exc:  # name the folder: a read-only or forbidden one is the user's to fix
        raise OSError(exc.errno, exc.strerror, str(key.parent)) from exc
    fh.seek(0), fh.truncate(), fh.write(f"{os.getpid()}\n"), fh.flush()
    _LOCKS[key] = _Lock(fh, os.getpid())
    return key


def _same_file(path: Path, fh) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fh.fileno())
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _drop(key: Path) -> None:
    lock = _LOCKS.get(key)
    if lock is not None:
        lock.users -= 1
        if lock.users <= 0:
            _release(key)


def _release(key: Path) -> None:
    lock = _LOCKS.pop(key)
    if lock.pid == os.getpid() and _same_file(key, lock.file):
        with contextlib.suppress(OSError):
            os.unlink(key)  # while still locked: a process that opened it meanwhile retries (_same_file)
    lock.file.close()


atexit.register(release_locks)
