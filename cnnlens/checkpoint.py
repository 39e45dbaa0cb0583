"""Training that survives interruption: the resumable checkpoint, where it is kept, and stop requests.

finetune keeps one checkpoint of a run (model, optimiser, scheduler, random generators, history, the
position in the epoch; cnnlens.training builds it) in a folder keyed by the run's inputs (`inputs`):
the params that shape the model, the prepared data, the downloaded weights and the code. A rerun
with the same inputs resumes from it; with any input changed it starts over and says which one
changed. The folder is `.cnnlens/checkpoints/<digest>/` beside the model out (`folder_for`), outside
every DVC out and ignored by git and DVC: dvc.lock and the run-cache only ever record what a complete
run wrote, and a resumed run writes the same bytes as an uninterrupted one (docs/resume.md).

A checkpoint is one file, written atomically (a temporary, fsync, rename) and ending in a SHA-256 of
its bytes: torch.load reads a file with a flipped byte without complaint, so a corrupt or truncated
checkpoint is found by its hash, named in one line, and training starts over.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

from cnnlens.cli import log
from cnnlens.errors import StageError, disk_error_line
from cnnlens.files import fsync_dir, lock_outputs, release_locks, remove_path

FORMAT = 1
MAGIC = b"cnnlens-ckpt-v1\n"  # then the SHA-256 (32 bytes) of everything before it
STATE, INPUTS = "state.pt", "inputs.json"
# a checkpoint is written at most every train.checkpoint_every seconds of training, and never sooner
# than OVERHEAD x the time the last write took: writing costs at most 1/OVERHEAD (2%) of training
OVERHEAD = 50
# the train keys that decide how a run is carried out, not what it computes: a checkpoint made with
# other values resumes (with another world size: equal up to float summation order, docs/resume.md)
HOW_IT_RUNS = frozenset(
    ("checkpoint_every", "resume", "max_restarts", "nproc_per_node", "nnodes", "node_rank")
    + ("rdzv_endpoint", "rdzv_timeout", "backend")
)
WHAT = {
    "params": "params (seed, model.arch or train)",
    "data": "prepared data",
    "weights": "downloaded weights",
    "code": "code (the .py files finetune runs)",
}


class Interrupted(StageError):
    """A stop request (Ctrl-C, SIGTERM) honoured after a step: the checkpoint is written. Exit code 130."""

    exit_code = 130


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def folder_for(model_out: str | os.PathLike) -> Path:
    """Where the checkpoints of the run writing `model_out` live: `.cnnlens/checkpoints/` beside it
    (a worker's temporary out sits beside the out too, so every process finds the same folder)."""
    return Path(model_out).parent / ".cnnlens" / "checkpoints"


def files_digest(folder: Path, subfolders: tuple[str, ...] = ("",)) -> str:
    """The files directly in `folder` (and in its `subfolders`), cheaply for any data size: the content
    of every JSON file (the classes, the shard index with every label and path, weights.json with the
    weights' SHA-256) and the name and size of every other file (the shards, whose index says what they hold)."""
    h = hashlib.sha256()
    for sub in subfolders:
        where = Path(folder) / sub
        if not where.is_dir():
            continue
        for path in sorted(p for p in where.iterdir() if p.is_file()):
            h.update(f"{path.relative_to(folder).as_posix()}\0".encode())
            h.update(path.read_bytes() if path.suffix == ".json" else str(path.stat().st_size).encode())
            h.update(b"\0")
    return h.hexdigest()[:16]


def project_imports(path: Path, root: Path) -> set[str]:
    """The project modules (files under `root`) that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if (root / (m.replace(".", "/") + ".py")).is_file()}


def code_files(entry: str | os.PathLike) -> list[Path]:
    """The .py files a stage runs: `entry` (stages/<name>.py) and the project modules it imports,
    transitively; the code deps dvc.yaml lists for that stage (tests/test_layout.py checks that list)."""
    entry = Path(entry).resolve()
    root = entry.parents[1]
    files, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path not in files:
            files.add(path)
            todo += [root / (m.replace(".", "/") + ".py") for m in project_imports(path, root)]
    return sorted(files)


def code_digest(entry: str | os.PathLike) -> str:
    """The digest of code_files(entry): their paths (under the project root) and contents."""
    root = Path(entry).resolve().parents[1]
    h = hashlib.sha256()
    for path in code_files(entry):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def inputs(
    *, params: str, data: str | os.PathLike, weights: str | os.PathLike, code: str | os.PathLike
) -> dict:
    """What a checkpoint is keyed by: `params` (a digest of the params that shape the model), and
    digests of the prepared data folder, the weights folder and the stage file's code."""
    return {
        "params": params,
        "data": files_digest(Path(data), ("", "shards")),
        "weights": files_digest(Path(weights)),
        "code": code_digest(code),
    }


def write_state(path: Path, state: dict) -> None:
    """torch.save(state) + MAGIC + its SHA-256 into `path`, atomically (temporary, fsync, rename)."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.write(MAGIC + hashlib.sha256(data).digest())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        remove_path(tmp)
    fsync_dir(path.parent)


def read_state(path: Path) -> dict:
    """The state write_state wrote; ValueError if the file is truncated or corrupt."""
    import torch

    data = path.read_bytes()
    end = len(data) - len(MAGIC) - 32
    if end < 0 or data[end : end + len(MAGIC)] != MAGIC:
        raise ValueError(f"truncated: {len(data)} bytes without the end marker")
    if hashlib.sha256(memoryview(data)[:end]).digest() != data[end + len(MAGIC) :]:
        raise ValueError("corrupt: its SHA-256 does not match its contents")
    state = torch.load(io.BytesIO(memoryview(data)[:end]), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a checkpoint of format {FORMAT}")
    return state


class Store:
    """The checkpoint of one run, `<root>/<digest of its inputs>/state.pt`, with `inputs.json` beside
    it (read to say which input changed when a rerun starts over). `resume`: False starts over anyway."""

    def __init__(self, root: str | os.PathLike, inputs: dict, *, resume: bool = True):
        self.root, self.inputs, self.resume = Path(root), dict(inputs), resume
        self.dir = self.root / _digest(json.dumps(self.inputs, sort_keys=True).encode())
        self.file = self.dir / STATE
        self.last_write = 0.0  # seconds the last save took
        self.writes, self.write_seconds = 0, 0.0  # saves so far, and their time

    def lock(self) -> "Store":
        """Hold this checkpoint for the life of the process (one run at a time writes it); at exit
        the folders made for the lock go again if they hold nothing."""
        lock_outputs(self.dir)
        atexit.register(self._remove_empty_folders)
        return self

    def _remove_empty_folders(self) -> None:
        release_locks()  # the lock files sit in the root
        for folder in (self.root, self.root.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def load(self) -> dict | None:
        """The saved state, or None: nothing saved (say why when another checkpoint exists), resume
        off, or an unreadable file (one line; it is removed)."""
        for stale in self.dir.glob(f".{STATE}.*.tmp"):  # a write cut short by a kill
            remove_path(stale)
        if not self.file.exists():
            self._explain_fresh_start()
            return None
        if not self.resume:
            log(f"finetune: train.resume = never: starting from epoch 1, not from {self.file}")
            return None
        try:
            state = read_state(self.file)
            if state.get("inputs") != self.inputs:
                raise ValueError("it records other inputs than its folder name says")
        except Exception as exc:  # torch.load raises several types for a damaged archive
            log(f"finetune: cannot resume from {self.file} ({one_reason(exc)}); starting from epoch 1")
            remove_path(self.dir)
            return None
        return state

    def _explain_fresh_start(self) -> None:
        """One line when the newest other checkpoint here was made from other inputs: which changed."""
        others = (
            [p for p in self.root.glob(f"*/{INPUTS}") if p.parent != self.dir] if self.root.is_dir() else []
        )
        if not others:
            return
        newest = max(others, key=lambda p: p.stat().st_mtime)
        try:
            theirs = json.loads(newest.read_text())
        except (OSError, ValueError):
            return
        changed = [WHAT[k] for k in WHAT if theirs.get(k) != self.inputs.get(k)]
        log(
            f"finetune: not resuming from {newest.parent}: the {' and '.join(changed) or 'inputs'} "
            "changed since it was written; starting from epoch 1"
        )

    def save(self, state: dict) -> None:
        """Write `state` (with the inputs) atomically; the first save removes the checkpoints of other
        inputs that no running stage holds. A failed write is one line, and training goes on."""
        start = time.perf_counter()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / INPUTS).exists():
                (self.dir / INPUTS).write_text(json.dumps(self.inputs, indent=2) + "\n")
            write_state(self.file, {**state, "inputs": self.inputs, "format": FORMAT})
        except OSError as exc:
            log(f"finetune: cannot write the checkpoint {self.file} ({one_reason(exc)}); training goes on")
            return
        self.last_write = time.perf_counter() - start
        self.writes, self.write_seconds = self.writes + 1, self.write_seconds + self.last_write
        if self.writes == 1:
            self._remove_others()

    def _remove_others(self) -> None:
        for other in self.root.iterdir():
            if other.is_dir() and other != self.dir:
                try:
                    lock_outputs(other)
                except StageError:  # a running stage holds it
                    continue
                remove_path(other)

    def remove(self) -> None:
        """Done: the outs are committed; the checkpoint has no further use."""
        remove_path(self.dir)


def one_reason(exc: BaseException) -> str:
    """An exception as a short clause for a log line."""
    text = disk_error_line(exc) or f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


class StopRequest:
    """While training: SIGINT and SIGTERM set a flag instead of raising, so the current step finishes,
    the checkpoint is written and the run stops (Interrupted). A second Ctrl-C stops at once, without a
    checkpoint, and so does a request not honoured within GRACE seconds (a rank stuck waiting for a
    dead one, a step too long to finish). The previous handlers are restored on exit. Outside the main
    thread, where Python cannot catch signals, the flag stays unset."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    GRACE = 20.0  # within the 30 s torchrun's agent and most schedulers grant after a SIGTERM

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}
        self.timer: threading.Timer | None = None
        self.expired = False

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.expired or signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
            name = signal.Signals(signum).name
            # os.write: a print() in a handler can land inside a print in progress (a reentrant call)
            what = "stopping after this step to write the checkpoint (Ctrl-C again: stop now)"
            os.write(2, f"finetune: {name}: {what}\n".encode())
            self.timer = threading.Timer(self.GRACE, self._expire)
            self.timer.daemon = True
            self.timer.start()

    def _expire(self) -> None:
        if self.previous:  # still training: stop now
            self.expired = True
            os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class Schedule:
    """Whether to write a checkpoint and whether to stop, after a step or an epoch. A checkpoint is due
    `every` seconds of training (at least OVERHEAD x the last write's time; `every` 0: after every step).
    With several processes (`world`) the ranks agree: after each step every rank posts [stop requested,
    checkpoint due] to an all-reduce (MAX, on CPU tensors over gloo) and acts on the result posted one
    step earlier, which has arrived by then, so all ranks act after the same step without waiting."""

    def __init__(self, every: float, stop: StopRequest, *, store: Store | None = None, world=None):
        self.every, self.stop, self.store, self.world = every, stop, store, world
        self.since = time.monotonic()
        self.asked = False  # a due checkpoint was posted and not yet written
        self.pending = None  # (work, tensor) of the last posted flags
        self.group = None
        if world is not None:
            backend = world.dist.get_backend()
            self.group = None if backend == "gloo" else world.dist.new_group(backend="gloo")

    def due(self) -> bool:
        if self.store is None or self.asked:
            return False
        wait = self.every and max(self.every, OVERHEAD * self.store.last_write)
        return time.monotonic() - self.since >= wait

    def after_step(self) -> tuple[bool, bool]:
        """(stop, checkpoint) to act on after this step."""
        flags = [self.stop.requested, self.due()]
        self.asked |= flags[1]
        if self.world is None:
            return flags[0], flags[1]
        import torch

        agreed = self._wait()
        posted = torch.tensor(flags, dtype=torch.int32)
        self.pending = (
            self.world.dist.all_reduce(
                posted, op=self.world.dist.ReduceOp.MAX, group=self.group, async_op=True
            ),
            posted,
        )
        return agreed

    def at_epoch_end(self) -> tuple[bool, bool]:
        """(stop, checkpoint) after an epoch, agreed at once (one small all-reduce an epoch)."""
        self._wait()
        self.asked = False
        flags = [self.stop.requested, self.due()]
        if self.world is None:
            return flags[0], flags[1]
        import torch

        posted = torch.tensor(flags, dtype=torch.int32)
        self.world.dist.all_reduce(posted, op=self.world.dist.ReduceOp.MAX, group=self.group)
        return bool(posted[0]), bool(posted[1])

    def _wait(self) -> tuple[bool, bool]:
        if self.pending is None:
            return False, False
        work, posted = self.pending
        self.pending = None
        work.wait()
        return bool(posted[0]), bool(posted[1])

    def written(self) -> None:
        self.since, self.asked = time.monotonic(), False
