"""The one downloader. Every file the package fetches goes through `fetch`, so that setting
`NANOGPT_DATA_MIRROR` to a local folder makes the whole package work without a network.

Mirror layout: the same relative paths as the project's shared data folder, e.g.

    $NANOGPT_DATA_MIRROR/tinyshakespeare/input.txt
    $NANOGPT_DATA_MIRROR/hellaswag/hellaswag_val.jsonl
    $NANOGPT_DATA_MIRROR/gpt2_bpe/encoder.json, gpt2_bpe/vocab.bpe
    $NANOGPT_DATA_MIRROR/tiktoken_cache/<sha1 of url>   (used as TIKTOKEN_CACHE_DIR when that is unset)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from nanogpt.errors import DataError

log = logging.getLogger(__name__)

MIRROR_ENV = "NANOGPT_DATA_MIRROR"


def mirror_path(mirror_relpath: str) -> Path | None:
    """The mirror's copy of a file, or None when there is no mirror or it lacks the file."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    path = Path(root) / mirror_relpath
    return path if path.is_file() else None


def fetch(mirror_relpath: str, url: str, dest: str | Path) -> Path:
    """Make `dest` exist: keep it if present, else copy the mirror's file, else download `url`.

    Both copy and download go to a temporary file renamed into place, so `dest` is never partial.
    """
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = mirror_path(mirror_relpath)
    if local is not None:
        log.info("copying %s from the data mirror", mirror_relpath)
        with open(local, "rb") as src:
            _write_atomic(dest, src)
        return dest
    if os.environ.get(MIRROR_ENV):
        log.warning("%s is not in %s=%s; downloading it", mirror_relpath, MIRROR_ENV, os.environ[MIRROR_ENV])
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            _write_atomic(dest, response)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"cannot download {url} ({reason}); offline, put the file at ${MIRROR_ENV}/{mirror_relpath} "
            f"or at {dest}"
        ) from None
    return dest


def _write_atomic(dest: Path, src) -> None:
    """Stream `src` (a binary file object) into `dest` via a temporary file in the same folder."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a data file is not
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
