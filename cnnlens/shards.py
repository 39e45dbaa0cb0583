"""Packed uint8 shards: how a prepared split too large for memory is written, memory-mapped and streamed.

The format and its writer live in cnnlens.packing. A reader maps the shard files with mmap and drops the
pages it has read (MADV_DONTNEED), so a pass over a split larger than RAM keeps a bounded resident set.

ShardedTensor looks like the images tensor to the code that reads it (len, shape, slicing,
indexing with an index tensor), reading only the rows asked for. Feeder streams training batches:
the next batch is gathered (and on CUDA copied from pinned memory on a side stream) while the
current one trains.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnnlens.errors import StageError
from cnnlens.packing import read_index, split_entry

# a pass over the shards drops the pages it has mapped once this much has been mapped: the resident set
# of a pass stays about this size, whatever the size of the split (the pages stay in the page cache)
RELEASE_BYTES = 256 * 2**20
# a read fault on a file mapping maps the aligned 64 KiB around the page (Linux's fault_around_bytes
# default) when those pages are cached: reading a row maps its span rounded out to these windows, which
# for random rows of a few KiB is several times the bytes read. Counting windows keeps the bound true.
FAULT_AROUND = 64 * 2**10


def _map(path: Path, rows: int, row_shape: tuple[int, ...]) -> tuple[torch.Tensor, mmap.mmap | None]:
    """Memory-map one raw uint8 file as a rows x row_shape tensor; its size must match exactly."""
    want = rows * int(np.prod(row_shape))
    if not path.exists():
        raise StageError(f"{path}: shard file missing; rerun `dvc repro prepare`")
    size = path.stat().st_size
    if size != want:
        raise StageError(
            f"{path}: {size} bytes, the index says {rows} images of {'x'.join(map(str, row_shape))} "
            f"({want} bytes); the shard is truncated or stale: rerun `dvc repro prepare`"
        )
    if want == 0:
        return torch.empty((0, *row_shape), dtype=torch.uint8), None
    with open(path, "rb") as fh:
        # a private (copy-on-write) map: writable as torch wants, never written, its pages droppable
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
    return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8)).view(rows, *row_shape), mm


def open_split(folder: Path, split: str):
    """(images, labels, paths, masks or None) of one split; images and masks are ShardedTensors.
    The index entry is checked first (split_entry): a bad one is one StageError line."""
    folder = Path(folder)
    index = read_index(folder)
    side = int(index["side"])
    files, counts, labels, paths = split_entry(folder, index, split)
    has_masks = bool(files) and all(m is not None for _, m in files)
    images = [_map(f, n, (3, side, side)) for (f, _), n in zip(files, counts)]
    masks = [_map(m, n, (side, side)) for (_, m), n in zip(files, counts)] if has_masks else None
    return (
        ShardedTensor(images, (3, side, side)),
        torch.tensor(labels, dtype=torch.int64),
        list(paths),
        None if masks is None else ShardedTensor(masks, (side, side)),
    )


def mapped_bytes(rows: torch.Tensor, row_bytes: int) -> int:
    """At most how many bytes reading these rows of one shard maps: each row's span in FAULT_AROUND windows."""
    first = rows * row_bytes // FAULT_AROUND
    last = ((rows + 1) * row_bytes - 1) // FAULT_AROUND
    return int((last - first + 1).sum()) * FAULT_AROUND


class ShardedTensor:
    """Memory-mapped shards read as one uint8 tensor: len, shape, slices and index tensors give
    ordinary (copied) tensors; `.to(device)` reads the whole thing (the resident path)."""

    dtype = torch.uint8

    def __init__(self, parts: list[tuple[torch.Tensor, mmap.mmap | None]], row_shape: tuple[int, ...]):
        self.parts = [t for t, _ in parts]
        self.part_maps = [m for _, m in parts]
        self.maps = [m for m in self.part_maps if m is not None]
        self.starts = torch.tensor([0] + [len(t) for t in self.parts]).cumsum(0)
        self.shape = torch.Size((int(self.starts[-1]), *row_shape))
        self.read = 0

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            key = torch.arange(start, max(start, stop), step)
        elif isinstance(key, int):
            return self[torch.tensor([key])][0]
        key = key.cpu() if isinstance(key, torch.Tensor) else torch.as_tensor(np.asarray(key))
        return self.gather(key.long())

    def gather(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` (a CPU index tensor) in that order, read from the shards they live in."""
        idx = idx.reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        if out is None:
            out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.uint8)
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        mapped, out_np, row_bytes = 0, out.numpy(), int(np.prod(self.shape[1:]))
        for s in shard.unique().tolist():
            where = (shard == s).nonzero().squeeze(1)
            rows = idx[where] - self.starts[s]
            # numpy copies on the calling thread alone: a torch index op on the feeder thread starts an
            # OpenMP team of its own, which competes with the training step's threads for the cores
            out_np[where.numpy()] = self.parts[s].numpy()[rows.numpy()]
            mapped += mapped_bytes(rows, row_bytes)
        self._count(mapped)
        return out

    def _count(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        """Drop the pages read so far from this process (they stay cached by the OS)."""
        self.read = 0
        for mm in self.maps:
            mm.madvise(mmap.MADV_DONTNEED)

    def to(self, *args, **kwargs) -> torch.Tensor:
        """The whole tensor in memory, then on the device: read shard by shard, each shard's pages
        dropped once copied, so the peak is the tensor plus one shard."""
        whole = torch.empty(self.shape, dtype=torch.uint8)
        for start, part, mm in zip(self.starts.tolist(), self.parts, self.part_maps):
            whole[start : start + len(part)] = part
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)
        return whole.to(*args, **kwargs)


def resident_budget(setting, device: torch.device) -> int:
    """train.resident_mb in bytes. auto: half the free memory of a CUDA device; 0 on a CPU, where the
    memory-mapped shards already are RAM (the OS page cache keeps what fits, shared by every process
    of a run) and a resident copy would only hold the set twice, once per process; a quarter of the
    available RAM on other devices (MPS: the copy lives in unified memory)."""
    if setting != "auto":
        return int(setting) * 2**20
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    if device.type == "cpu":
        return 0
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class Feeder:
    """Training batches from a ShardedTensor, one batch ahead: plan(batches) says which index
    tensors an epoch will ask for; get(idx) returns the one gathered meanwhile on a worker thread
    (on CUDA: into pinned memory, then copied on a side stream). A batch that was not planned is
    read when asked. `wait` sums the seconds get() spent waiting for data."""

    def __init__(self, images: ShardedTensor, device: torch.device):
        self.images, self.device = images, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="feeder")
        self.plan_, self.pending = [], None
        self.wait, self.hits, self.misses = 0.0, 0, 0

    def plan(self, batches: list[torch.Tensor]) -> None:
        """The index tensors an epoch will ask for, in turn; reading the first starts now."""
        self.plan_ = [(b, b.cpu()) for b in batches]
        self.pending = None
        self._advance()

    def _advance(self) -> None:
        if self.plan_:
            planned, cpu_idx = self.plan_.pop(0)
            self.pending = (planned, self.pool.submit(self._load, cpu_idx))
        else:
            self.pending = None

    def _load(self, idx: torch.Tensor):
        if not self.cuda:
            return self.images.gather(idx), None
        host = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        self.images.gather(idx, out=host)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return x, done

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.pending is not None and _same_view(self.pending[0], idx):
            x, done = self.pending[1].result()
            self.hits += 1
            self._advance()
        else:  # not the planned batch: the plan is off, read this one now
            self.plan_, self.pending = [], None
            x, done = self._load(idx.cpu())
            self.misses += 1
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)
        self.wait += time.perf_counter() - start
        return x

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b is the very slice a (same storage, offset, shape): no device sync to compare values."""
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )
