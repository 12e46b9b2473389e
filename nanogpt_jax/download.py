"""The one downloader: every file the package fetches from the internet goes through `fetch`.

Air-gapped machines set `NANOGPT_DATA_MIRROR` to a local folder holding the same relative paths
as the project's shared data folder, and nothing is downloaded:

    $NANOGPT_DATA_MIRROR/tinyshakespeare/input.txt      data_prep/shakespeare*.py
    $NANOGPT_DATA_MIRROR/hellaswag/hellaswag_val.jsonl  the HellaSwag evaluation
    $NANOGPT_DATA_MIRROR/tiktoken_cache/<sha1 of url>   tiktoken's GPT-2 files (see `tiktoken_cache_dir`)

A file is written under a temporary name in the destination folder and renamed into place, so an
interrupted copy or download never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from absl import logging

from nanogpt_jax.errors import DataError

MIRROR_ENV = "NANOGPT_DATA_MIRROR"
TIMEOUT_S = 60  # per network read


def mirror_file(mirror_relpath: str) -> Path | None:
    """`$NANOGPT_DATA_MIRROR/mirror_relpath` when the variable is set and the file exists, else None."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    path = Path(root).expanduser() / mirror_relpath
    return path if path.is_file() else None


def fetch(mirror_relpath: str, url: str, dest: str | os.PathLike) -> Path:
    """Make `dest` exist and return its path: kept if already there, else copied from the mirror, else downloaded.

    Args:
      mirror_relpath: the file's path inside the mirror folder, e.g. "tinyshakespeare/input.txt".
      url: where to download it from when there is no mirror copy.
      dest: the local file to create (its folder is created).
    Raises:
      DataError: the download failed (the message names the mirror path that would avoid it), or
        `dest`'s folder cannot be written.
    """
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    missing = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # the folders this call creates
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest.parent} ({e.strerror}); choose a writable folder") from None
    try:
        return _copy_or_download(mirror_relpath, url, dest)
    except DataError:  # a failed fetch leaves no empty folder behind
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


def _copy_or_download(mirror_relpath: str, url: str, dest: Path) -> Path:
    local = mirror_file(mirror_relpath)
    if local is not None:
        logging.info("copying %s from the data mirror %s", mirror_relpath, local.parent)
        try:
            with open(local, "rb") as src:
                write_atomic(src, dest)
        except OSError as e:
            raise DataError(f"cannot copy {local} to {dest} ({e.strerror or e}); check both paths") from None
        return dest
    if os.environ.get(MIRROR_ENV):
        logging.warning("%s has no %s; downloading %s", MIRROR_ENV, mirror_relpath, url)
    logging.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            write_atomic(response, dest)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url} ({reason}); offline, put the file at "
                        f"${MIRROR_ENV}/{mirror_relpath} (or at {dest})") from None
    except OSError as e:  # the network errors are caught above: this is the local disk
        raise DataError(f"cannot write {dest} ({e.strerror or e}); free some space or choose another folder") from None
    return dest


def write_atomic(src: BinaryIO, dest: Path) -> None:
    """Stream `src` into a temporary file beside `dest`, then rename it to `dest`: a crash leaves the
    old file or the new one, never half of one. Raises DataError if dest's folder is not writable."""
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent} ({e.strerror}); choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(dest: Path, text: str) -> None:
    """`write_atomic` for text (UTF-8)."""
    write_atomic(io.BytesIO(text.encode()), dest)


def tiktoken_cache_dir() -> Path | None:
    """The mirror's tiktoken cache folder, when the mirror has one (used if TIKTOKEN_CACHE_DIR is unset)."""
    root = os.environ.get(MIRROR_ENV)
    path = Path(root).expanduser() / "tiktoken_cache" if root else None
    return path if path is not None and path.is_dir() else None
