"""Paths that may be Cloud Storage URLs: out_dir, data_dir, eval and bench outputs, exports, init_from.

    out = storage.path("gs://my-bucket/runs/owt")          # etils.epath.Path (gcsfs underneath)
    out = storage.path("out/owt")                          # pathlib.Path, exactly as before
    storage.write_atomic(out / "summary.json", text)       # a reader never sees half a file
    local = storage.local_data_dir("gs://my-bucket/data/owt", "~/.cache/nanogpt_jax/data")

One rule: a path holding "://" is a URL and goes through `etils.epath` (which orbax uses too, so
checkpoints and our own files share one client: gcsfs for gs://, reading credentials the way every
Google client does: Application Default Credentials, a TPU VM's service account); any other path is
a local `pathlib.Path`, so local runs behave exactly as before. Both have the pathlib API
(`/`, exists, is_dir, iterdir, read_text, write_bytes, mkdir, unlink, rename).

Cloud Storage has no folders and no appends: an object is written whole by one upload, and a reader
sees the old object or the new one, never part of one. That is why `write_atomic` needs no
temporary name on a bucket, and why files that grow (metrics.csv, TensorBoard events) are written
locally and uploaded whole (`loggers`).

Data is memory-mapped, which a bucket cannot be: `local_data_dir` copies a bucket's data folder to
a local cache, resumably, and checks the copy against meta.json's sizes and sha256 before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Union

import fsspec
from absl import logging
from etils import epath

from nanogpt_jax import download
from nanogpt_jax.errors import DataError, UserError
from nanogpt_jax.progress import Progress

# A bucket folder is shared by every host of a run (and by the next run): a listing cached by gcsfs
# would hide the checkpoints another process saved since, so gcsfs lists afresh each time.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

AnyPath = Union[pathlib.Path, epath.Path]  # noqa: UP007 - a runtime alias
CHUNK_BYTES = 8 << 20  # download and hash in pieces of this size
DEFAULT_CACHE_DIR = "~/.cache/nanogpt_jax/data"  # configs/default.py's data.cache_dir


def is_url(p: str | os.PathLike) -> bool:
    """Whether `p` names a remote location (gs://bucket/..., or any scheme fsspec knows)."""
    return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> AnyPath:
    """`p` as a path object: an `etils.epath.Path` for a URL, a `pathlib.Path` (`~` expanded) otherwise."""
    if isinstance(p, epath.Path) and not isinstance(p, pathlib.PurePath):
        return p
    text = os.fspath(p)
    return epath.Path(text) if is_url(text) else pathlib.Path(text).expanduser()


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/names...` as a string that keeps a URL's `//` (pathlib would make gs://b into gs:/b)."""
    return os.fspath(path(base).joinpath(*names))


def write_atomic(p: str | os.PathLike, data: bytes | str) -> None:
    """Write a whole file so that a reader (or a crash) sees the old content or the new, never part:
    locally a temporary sibling renamed over `p`; on a bucket one upload (objects are replaced whole).
    The parent folder is created. Raises UserError (see `explain`) when the location cannot be written."""
    target = path(p)
    raw = data.encode() if isinstance(data, str) else data
    try:
        if isinstance(target, pathlib.Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            download.write_atomic(io.BytesIO(raw), target)
        else:
            target.write_bytes(raw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError locally; gcsfs / google-auth errors on a bucket
        raise explain(e, target, "write") from None


def upload(local: str | os.PathLike, remote: str | os.PathLike) -> None:
    """Copy a local file to `remote` (a URL or a local path) in one piece; see `write_atomic`."""
    write_atomic(remote, pathlib.Path(local).read_bytes())


# ---- errors --------------------------------------------------------------------------------------


def _status(e: BaseException) -> int | None:
    code = getattr(e, "code", None)
    return code if isinstance(code, int) else None


def explain(e: BaseException, where: str | os.PathLike, doing: str = "access") -> UserError:
    """A one-line `UserError` for a failed access to `where`: which problem (no bucket, no credentials,
    no permission, no network) and the fix. Local OSErrors keep their own words."""
    where = os.fspath(where)
    name = type(e).__name__
    text = " ".join(str(e).split())[:200]
    if not is_url(where):
        return UserError(f"cannot {doing} {where} ({getattr(e, 'strerror', None) or text}); choose a writable "
                         "local folder or a gs:// URL")
    bucket = where.split("://", 1)[1].split("/", 1)[0]
    if "DefaultCredentialsError" in name or "credentials" in text.lower() or _status(e) == 401:
        return UserError(f"cannot {doing} {where}: no Google Cloud credentials ({text[:120]}); run `gcloud auth "
                         "application-default login`, or on a Cloud TPU VM give its service account access to the "
                         f"bucket gs://{bucket}")
    if isinstance(e, PermissionError) or _status(e) == 403:
        return UserError(f"cannot {doing} {where}: permission denied ({text[:120]}); grant this account "
                         f"roles/storage.objectAdmin on gs://{bucket}, or use another bucket")
    if isinstance(e, FileNotFoundError) or _status(e) == 404:
        return UserError(f"cannot {doing} {where}: not found ({text[:120]}); check the bucket name gs://{bucket} "
                         f"(create it with: gcloud storage buckets create gs://{bucket}) and the path")
    return UserError(f"cannot {doing} {where} ({name}: {text}); check the URL and your network")


def check_bucket(url: str | os.PathLike, key: str) -> None:
    """Fail now, with one line, unless the bucket of `url` exists and can be listed with this machine's
    credentials (`key`: the config key or flag that named it, for the message). Creates nothing.

    Raises:
        UserError: no such bucket, no credentials, no permission, or the server cannot be reached.
    """
    url = os.fspath(url)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise UserError(f"{key}={url!r} names no bucket; write gs://BUCKET/PATH")
    root = epath.Path(url.split("://", 1)[0] + "://" + bucket)
    try:
        next(iter(root.iterdir()), None)  # a listing needs only object permissions (not buckets.get)
    except FileNotFoundError:
        raise UserError(f"{key}={url!r}: the bucket gs://{bucket} does not exist; create it (gcloud storage "
                        f"buckets create gs://{bucket} --location=REGION) or fix the name") from None
    except Exception as e:  # noqa: BLE001 - gcsfs, google-auth and aiohttp raise many types
        raise UserError(f"{key}={url!r}: " + str(explain(e, url, "list")).split(": ", 1)[-1]) from None


# ---- a bucket's data folder in a local cache -----------------------------------------------------


def sha256_file(p: str | os.PathLike) -> str:
    """The hex sha256 of a local file, read in CHUNK_BYTES pieces (~1 s per GB)."""
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder(url: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """Where `url`'s copy lives: cache_dir/<bucket>/<path> (readable, one folder per URL)."""
    scheme, rest = url.split("://", 1)
    return pathlib.Path(cache_dir).expanduser() / (scheme if scheme != "gs" else "") / rest.strip("/")


@contextlib.contextmanager
def _locked(folder: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`: processes on one host copy it once, the others wait."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _expected(meta: dict, split: str) -> tuple[int | None, str | None]:
    """(bytes, sha256) of a split as meta.json records them (data_prep writes both; None: unknown)."""
    import numpy as np

    entry = meta.get("splits", {}).get(split, {})
    tokens = entry.get("tokens")
    size = None if tokens is None else int(tokens) * np.dtype(meta.get("dtype", "uint16")).itemsize
    return size, entry.get("sha256")


def _download(remote: epath.Path, local: pathlib.Path, size: int, show: bool) -> None:
    """Copy `remote` to `local` by way of `local.partial`, resuming a partial copy left by a kill;
    `local` appears (renamed) only once `size` bytes are there."""
    partial = local.with_name(local.name + ".partial")
    done = partial.stat().st_size if partial.exists() else 0
    if done > size:  # not a prefix of this file (the bucket's file changed): start again
        partial.unlink()
        done = 0
    if done:
        logging.info("resuming the copy of %s at %.1f of %.1f MB", remote, done / 1e6, size / 1e6)
    elif show:
        logging.info("copying %s (%.1f MB) to %s", remote, size / 1e6, local)
    progress = Progress(f"copying {remote.name}", total=max(size // (1 << 20), 1), unit="MB") if show else None
    with remote.open("rb") as src, open(partial, "ab") as dst:
        src.seek(done)
        while chunk := src.read(CHUNK_BYTES):
            dst.write(chunk)
            if progress:
                progress.update(len(chunk) >> 20)
    got = partial.stat().st_size
    if got != size:
        raise DataError(f"copying {remote} gave {got:,} bytes, expected {size:,}; run again to resume the copy")
    os.replace(partial, local)


def local_data_dir(url: str | os.PathLike, cache_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"),
                   show_progress: bool = True) -> pathlib.Path:
    """A local folder holding the bucket data folder `url`'s meta.json and the `splits`' .bin files,
    checked, ready to memory-map; a local `url` is returned as it is.

    Each file is copied into `cache_folder(url, cache_dir)` (`<name>.partial` until complete; a copy
    cut short by a kill resumes where it stopped). A copy is used only when its size is the one
    meta.json records (tokens x dtype size) and its sha256 is meta.json's `sha256` for that split
    (written by data_prep; checked after each copy, and remembered in `<name>.sha256` so later starts
    compare sizes and that note instead of re-reading the file). A copy that fails the check is
    deleted and copied again once. Processes on one host take turns (a file lock), so one copies
    and the others find a valid copy.

    Raises:
        DataError: the folder has no meta.json or no `<split>.bin`; a copy does not match meta.json.
        UserError: no such bucket, no credentials or no network (see `explain`).
    """
    if not is_url(url):
        return pathlib.Path(url).expanduser()
    url = os.fspath(url).rstrip("/")
    remote = epath.Path(url)
    local = cache_folder(url, cache_dir)
    try:
        names = {p.name for p in remote.iterdir()} if remote.exists() else set()
    except Exception as e:  # noqa: BLE001
        raise explain(e, url, "read") from None
    missing = [f for f in ("meta.json", *(f"{s}.bin" for s in splits)) if f not in names]
    if missing:
        check_bucket(url, "data.data_dir")
        raise DataError(f"data.data_dir={url} has no {', '.join(missing)}; prepare it there with: python "
                        f"data_prep/<dataset>.py --out_dir {url}")
    meta_text = (remote / "meta.json").read_text()
    meta = json.loads(meta_text)
    with _locked(local):
        write_atomic(local / "meta.json", meta_text)
        for split in splits:
            _fetch_checked(remote / f"{split}.bin", local / f"{split}.bin", meta, split, show_progress)
    return local


def _fetch_checked(remote: epath.Path, local: pathlib.Path, meta: dict, split: str, show: bool) -> None:
    size, sha = _expected(meta, split)
    if size is None:
        size = remote.stat().length
    note = local.with_name(local.name + ".sha256")
    if local.exists() and local.stat().st_size == size and note.exists() and note.read_text() == (sha or "size"):
        return  # checked when it was copied
    for attempt in (1, 2):
        if not (local.exists() and local.stat().st_size == size):
            local.unlink(missing_ok=True)
            _download(remote, local, size, show)
        if sha is None:
            logging.warning("%s records no sha256 for %s (prepared by an older data_prep); checked its size only",
                            remote.parent / "meta.json", split)
            write_atomic(note, "size")
            return
        if sha256_file(local) == sha:
            write_atomic(note, sha)
            return
        local.unlink()
        if attempt == 1:
            logging.warning("the copy of %s does not match meta.json's sha256; copying it again", remote)
    raise DataError(f"{remote}'s content does not match its meta.json's sha256 (two copies); prepare the folder "
                    "again: python data_prep/<dataset>.py --out_dir " + os.fspath(remote.parent))


WEIGHTS_CACHE_DIR = "~/.cache/nanogpt_jax/weights"  # local copies of gs:// Hugging Face folders (init_from)


def local_folder(url: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local copy of the files directly in the bucket folder `url` (e.g. an HF folder: config.json,
    model.safetensors), in `cache_folder(url, cache_dir)`; a file already there with the bucket's size
    is not copied again (HF folders carry no checksums; a partial copy resumes as in `local_data_dir`).

    Raises:
        UserError: no such folder or bucket, no credentials (see `explain`).
    """
    url = os.fspath(url).rstrip("/")
    local = cache_folder(url, cache_dir or WEIGHTS_CACHE_DIR)
    try:
        files = [p for p in epath.Path(url).iterdir() if not p.is_dir()]
        if not files:
            raise FileNotFoundError(f"no files under {url}")
        sizes = {p.name: p.stat().length for p in files}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(e, url, "read") from None
    with _locked(local):
        for p in files:
            target = local / p.name
            if not (target.exists() and target.stat().st_size == sizes[p.name]):
                target.unlink(missing_ok=True)
                _download(p, target, sizes[p.name], show=True)
    return local
