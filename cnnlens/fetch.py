"""Fetching and unpacking inputs safely: verified downloads and guarded zip extraction.

`download` streams a URL into a temporary file beside its destination and renames it into place
only after the size and SHA-256 match, so a failed or tampered transfer never leaves a file that
looks complete. `safe_extract_zip` refuses the classic archive attacks (zip-slip paths, symlink
entries, decompression bombs) before writing anything.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from cnnlens import __version__
from cnnlens.cli import log
from cnnlens.errors import StageError
from cnnlens.files import atomic_path

# First retry waits this long, then twice as long each time. Tests run the stage as a subprocess
# and set FETCH_RETRY_BASE_DELAY=0 so that retries cost no wall time.
RETRY_BASE_DELAY = float(os.environ.get("FETCH_RETRY_BASE_DELAY", "1.0"))
CHUNK = 1 << 16
USER_AGENT = f"cnnlens/{__version__} (+python urllib)"

# What to do without a network, said once: a failed download ends its message with one of these.
DATA_HINT = (
    "To work offline: `make demo` uses synthetic data; or set data.source in params.yaml "
    "to a local .zip or ImageFolder directory."
)
WEIGHTS_HINT = (
    "To work offline: set model.weights: none (random init, as `make demo` does) or "
    "model.weights: path/to/state_dict.pth in params.yaml."
)


class _Transient(Exception):
    """A failure worth retrying: network trouble, a 5xx, a cut-short transfer."""


def download(
    url: str,
    dest,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    desc: str | None = None,
    hint: str = "",
) -> dict:
    """Download `url` to `dest`; return {"url", "bytes", "sha256"}.

    `expected_sha256` may be a full hex digest or a prefix of at least 8 hex digits (torchvision
    weight files carry one in their name; torch.hub checks it the same way). Only transient
    failures are retried, with exponential back-off; an HTTP 4xx or a wrong size/hash is final.
    On any failure `dest` is left as it was and no partial file remains; the message ends with
    `hint` (DATA_HINT, WEIGHTS_HINT: what to do offline).
    """
    dest = Path(dest)
    hint = f" {hint}" if hint else ""
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", expected_sha256):
            raise StageError(
                f"expected SHA-256 for {url} must be 8 to 64 hex digits, got {expected_sha256!r}"
            )
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with atomic_path(dest) as tmp:
                got = _fetch_once(
                    url, tmp, timeout=timeout, expected_size=expected_size, desc=desc or dest.name, hint=hint
                )
                _verify(url, got, expected_size=expected_size, expected_sha256=expected_sha256, hint=hint)
            return got
        except _Transient as exc:
            if attempt == attempts:
                raise StageError(
                    f"download of {url} failed after {attempts} attempt(s): {exc}.{hint}"
                ) from None
            delay = RETRY_BASE_DELAY * 2 ** (attempt - 1)
            log(f"{url}: {exc}; retrying in {delay:g}s (attempt {attempt + 1} of {attempts})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _open(url: str, timeout: float, hint: str):
    """The HTTP response; a server or network fault that may pass raises _Transient."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        what = f"HTTP {exc.code} {exc.reason} (expected 200 OK)"
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(what) from None
        raise StageError(f"download of {url} failed: {what}; check the URL.{hint}") from None
    except urllib.error.URLError as exc:
        raise _Transient(f"cannot connect ({exc.reason}); expected a reachable server") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad status lines
        raise _Transient(f"cannot connect ({type(exc).__name__}: {exc})") from None


def _fetch_once(url, tmp: Path, *, timeout, expected_size, desc, hint) -> dict:
    response = _open(url, timeout, hint)
    digest = hashlib.sha256()
    done = 0
    with response:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced and announced.isdigit() else None
        if expected_size is not None and announced is not None and announced != expected_size:
            # The server offers a different file than the one we know; do not fetch it.
            raise StageError(
                f"download of {url}: expected {expected_size} bytes, the server announces "
                f"{announced} bytes (Content-Length); the file changed upstream.{hint}"
            )
        try:
            with (
                open(tmp, "wb") as fh,
                tqdm(
                    total=announced or expected_size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=desc,
                    file=sys.stderr,
                    mininterval=0.5,
                    leave=False,
                    disable=None,
                ) as bar,
            ):
                while block := response.read(CHUNK):
                    fh.write(block)
                    digest.update(block)
                    done += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as exc:  # timeout or reset mid-transfer
            raise _Transient(
                f"transfer interrupted after {done} bytes "
                f"(expected {announced if announced is not None else 'more'}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
    # http.client returns b"" instead of raising when the peer closes early, so compare ourselves.
    if announced is not None and done != announced:
        raise _Transient(f"transfer cut short: expected {announced} bytes (Content-Length), got {done}")
    return {"url": url, "bytes": done, "sha256": digest.hexdigest()}


def _verify(url, got: dict, *, expected_size, expected_sha256, hint) -> None:
    if expected_size is not None and got["bytes"] != expected_size:
        raise StageError(
            f"download of {url}: expected {expected_size} bytes, got {got['bytes']} bytes; "
            f"the file changed upstream or the transfer was altered.{hint}"
        )
    if expected_sha256 is not None and not got["sha256"].startswith(expected_sha256):
        kind = "SHA-256" if len(expected_sha256) == 64 else "SHA-256 prefix"
        raise StageError(
            f"download of {url}: expected {kind} {expected_sha256}, got {got['sha256']} "
            f"({got['bytes']} bytes); the file changed upstream or the transfer was "
            f"altered. If you trust the new file, pin its hash instead.{hint}"
        )


# ---------------------------------------------------------------------------------------------
# zip extraction


def safe_extract_zip(zip_path, dest_dir, *, max_bytes: int) -> Path:
    """Extract `zip_path` into the new directory `dest_dir` (replaced atomically); return it.

    Refused, before anything is written: entries whose path escapes the target (`..`, absolute
    paths, drive letters), symlink entries, and archives that declare more than `max_bytes`
    uncompressed. The bytes actually written are counted too, in case the headers lie.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StageError(f"{zip_path}: not a readable zip archive ({exc}); check data.source") from None
    with zf:
        plan = _extraction_plan(zf, zip_path, max_bytes)
        budget = [max_bytes]  # bytes still allowed, shared by all entries
        with atomic_path(dest_dir) as tmp:
            tmp.mkdir()
            for info, parts in plan:
                _extract_entry(
                    zf, info, tmp.joinpath(*parts), zip_path=zip_path, budget=budget, max_bytes=max_bytes
                )
    return dest_dir


def _extraction_plan(zf: zipfile.ZipFile, zip_path: Path, max_bytes: int) -> list:
    """[(info, safe path parts)] for every entry, or a StageError for an unsafe archive."""
    plan, declared = [], 0
    for info in zf.infolist():
        parts = _safe_parts(zip_path, info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise StageError(
                f"{zip_path}: refusing symlink entry {info.filename!r}; the archive is unsafe to extract"
            )
        declared += info.file_size
        if parts:
            plan.append((info, parts))
    if declared > max_bytes:
        raise StageError(
            f"{zip_path}: declares {declared} bytes uncompressed, more than the limit of "
            f"{max_bytes} bytes (data.max_extract_mb); refusing a possible zip bomb"
        )
    return plan


def _extract_entry(zf, info, target: Path, *, zip_path: Path, budget: list, max_bytes: int) -> None:
    """One entry to `target`, counting its real bytes against budget[0]."""
    try:
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "xb") as dst:
            while block := src.read(CHUNK):
                budget[0] -= len(block)
                if budget[0] < 0:
                    raise StageError(
                        f"{zip_path}: entry {info.filename!r} unpacks past the limit "
                        f"of {max_bytes} bytes (data.max_extract_mb); refusing"
                    )
                dst.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise StageError(
            f"{zip_path}: entry {info.filename!r} is corrupt ({exc}); delete the archive and download it again"
        ) from None
    except FileExistsError:
        raise StageError(
            f"{zip_path}: entry {info.filename!r} appears twice; refusing an ambiguous archive"
        ) from None
    except OSError as exc:
        raise StageError(f"{zip_path}: cannot extract entry {info.filename!r} ({exc})") from None


def _safe_parts(zip_path, name: str) -> list[str]:
    """The path components of a zip entry, or StageError when it would land outside the target."""

    def refuse(why):
        raise StageError(f"{zip_path}: refusing entry {name!r}: {why}; the archive is unsafe to extract")

    if "\x00" in name:
        refuse("NUL in the name")
    if name.startswith(("/", "\\")):
        refuse("absolute path")
    if re.match(r"^[A-Za-z]:", name):
        refuse("drive letter")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        refuse("path escapes the target directory")
    return parts
