"""One live run per out_dir: a training run holds a lock in its folder while it writes there.

Two runs writing one folder (a second terminal, a cluster job submitted twice) interleave their
metrics.csv rows and delete each other's checkpoints. The first run to open the folder holds it; a
second is refused in one line naming the first (host, pid, start time).

    lock = RunLock("out/owt")       # or gs://bucket/runs/owt
    lock.acquire()                  # UserError if another live run holds it
    ...
    lock.release()                  # also released when the process dies (see below)

- A local folder: an OS file lock (`fcntl.flock`) on `out_dir/run.lock`. The kernel drops it when the
  process ends however it ends (a kill -9 included), so a dead run's lock is never in the way. It works
  on NFS (Linux emulates flock with NFS byte-range locks).
- A bucket: Cloud Storage has no locks. The lock is the object `out_dir/run.lock`, created only if it
  does not exist (an upload with the precondition ifGenerationMatch=0, which the service checks
  atomically). The holder rewrites it (over its own generation only) every `REFRESH_S`. A new run that
  finds a lock watches it: rewritten meanwhile, its holder is alive and the new run is refused (within
  about REFRESH_S); not rewritten for `STALE_S`, it is a dead run's (killed, its host lost), and the new
  run takes it over, overwriting exactly that generation (of two runs taking over at once, one wins).
  So a job restarted right after a kill waits up to STALE_S, then goes on. A lock's age is the
  service's `updated` time against this host's clock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import socket
import sys
import threading
import time
from typing import Any

from absl import logging

from nanogpt_jax import storage
from nanogpt_jax.errors import UserError

LOCK_NAME = "run.lock"
_BOUNDARY = "==nanogpt_jax=="  # of the multipart upload that writes a bucket lock
REFRESH_S = 30.0  # a bucket lock's holder rewrites it this often
STALE_S = 120.0  # a bucket lock not rewritten for this long belongs to a dead run: it is taken over
RELEASE_WAIT_S = 10.0  # the longest a run's end waits for its bucket lock's deletion


def _holder() -> dict[str, Any]:
    """What a refused run is told about the one holding the folder."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def _describe(raw: str | bytes) -> str:
    try:
        h = json.loads(raw)
        return f"the run of pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "another run"


def check_free(out_dir: str | os.PathLike) -> None:
    """At start-up, before compiling: refuse at once a local out_dir whose lock a live run holds (it is
    tried and let go; nothing is created). A bucket's lock is judged only by watching it for a refresh,
    which `RunLock.acquire` does when the run opens the folder.

    Raises:
        UserError: another live run holds the folder (names it, as `RunLock.acquire` does).
    """
    path = storage.path(out_dir) / LOCK_NAME
    if not isinstance(path, pathlib.Path):
        return
    import fcntl

    try:
        f = open(path)  # noqa: SIM115 - closed below
    except OSError:  # no lock file (a new folder), or one we cannot read: acquire() decides later
        return
    with f:
        try:
            _flock_or_refuse(f, os.fspath(out_dir))
        except OSError:  # a file system without locks: acquire() says so later
            return
        fcntl.flock(f, fcntl.LOCK_UN)


def _flock_or_refuse(f: Any, out_dir: str) -> None:
    """Take the exclusive flock on the open lock file `f`; if a live run holds it, close `f` and raise
    the one-line refusal naming that run (UserError)."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _describe(f.read())
        f.close()
        raise _refusal(out_dir, holder) from None


def _refusal(out_dir: str, holder: str, extra: str = "") -> UserError:
    return UserError(f"out_dir {out_dir!r} is in use by {holder}{extra}; wait for it to end or choose another "
                     "--config.out_dir (two runs writing one folder mix their logs and checkpoints)")


class RunLock:
    """The lock on one out_dir (see the module docstring). Not re-entrant; one per process.

    Args:
        out_dir: a local folder (created if missing) or a gs:// URL.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = os.fspath(out_dir)
        self.path = storage.path(out_dir) / LOCK_NAME
        self._file: Any = None  # local: the open file that holds the flock
        self._generation: str | None = None  # bucket: our object's generation
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Hold out_dir, or raise.

        Raises:
            UserError: another live run holds it (names that run and what to do), or the lock cannot be
                written (the folder or bucket refuses writes).
        """
        if isinstance(self.path, pathlib.Path):
            self._acquire_local()
        else:
            self._acquire_bucket()

    def release(self) -> None:
        """Let the folder go. Safe to call twice, and after a failed acquire."""
        self._stop.set()
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._generation is not None:
            generation, self._generation = self._generation, None

            def delete() -> None:
                try:
                    self._call("DELETE", ifGenerationMatch=generation)
                except Exception as e:  # noqa: BLE001 - taken over, already gone, or the bucket is unreachable
                    logging.debug("releasing %s: %s", self.path, e)

            # a bucket that stopped answering is retried for about a minute: the run's end does not wait for
            # that (the lock then goes stale, and the next run takes it over)
            deleting = threading.Thread(target=delete, name="nanogpt_jax-run-lock-release", daemon=True)
            deleting.start()
            deleting.join(RELEASE_WAIT_S)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refused(self, holder: str, extra: str = "") -> UserError:
        return _refusal(self.out_dir, holder, extra)

    # ---- a local folder ------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open: the lock lives as long as the file
        except OSError as e:
            raise UserError(f"out_dir={self.out_dir!r} is not writable ({e.strerror}); choose another "
                            "--config.out_dir") from None
        _flock_or_refuse(f, self.out_dir)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()) + "\n")
        f.flush()
        self._file = f

    # ---- a bucket ------------------------------------------------------------------------------------

    def _fs(self) -> Any:
        import fsspec

        return fsspec.filesystem("gs")

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = os.fspath(self.path).split("://", 1)[1].partition("/")
        return bucket, key

    def _call(self, method: str, **params: Any) -> Any:
        bucket, key = self._bucket_key()
        return self._fs().call(method, "b/{}/o/{}", bucket, key, json_out=method == "GET", **params)

    def _upload(self, if_generation_match: str) -> str:
        """Write our holder record as the lock object, only if the live object's generation is
        `if_generation_match` ("0": only if there is none); returns the new generation.

        Raises:
            FileExistsError: the precondition failed (gcsfs's reading of HTTP 412).
        """
        fs = self._fs()
        bucket, key = self._bucket_key()
        location = getattr(fs, "_location", "https://storage.googleapis.com")
        # a multipart upload (name and content in one request), as gcsfs makes them: the service checks
        # the precondition against the live object atomically
        body = (f"--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}\n"
                f"--{_BOUNDARY}\nContent-Type: application/json\n\n{json.dumps(_holder())}\n--{_BOUNDARY}--")
        done = fs.call("POST", f"{location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
                       ifGenerationMatch=if_generation_match, data=body.encode(), json_out=True,
                       headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'})
        return str(done["generation"])

    def _create(self) -> bool:
        """Create the lock object if there is none; True if this run now holds it."""
        try:
            self._generation = self._upload("0")
        except FileExistsError:
            return False
        return True

    def _acquire_bucket(self) -> None:
        try:
            while not self._create():
                if self._take_over_when_stale():
                    break
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - gcsfs / google-auth errors
            raise storage.explain(e, self.out_dir, "write to") from None
        threading.Thread(target=self._refresh, name="nanogpt_jax-run-lock", daemon=True).start()

    def _take_over_when_stale(self) -> bool:
        """Someone's lock is there. Watch it: rewritten (its holder is alive) -> refuse; not rewritten for
        STALE_S -> take it over (True); gone -> False (create it afresh). A run restarted right after its
        predecessor was killed (a requeued job) waits here for the dead run's lock to go stale."""
        try:
            seen = self._call("GET")
        except FileNotFoundError:
            return False
        holder = _describe(self._fs().cat_file(os.fspath(self.path)))
        waited = False
        while (age := _age_s(seen)) < STALE_S:
            if not waited:
                logging.warning("out_dir %s is held by %s (its lock %s was written %.0f s ago): waiting up to %.0f s "
                                "for that lock to go stale, as a dead run's does; a live run rewrites it every %.0f s, "
                                "and then this run stops", self.out_dir, holder, self.path, age, STALE_S - age,
                                REFRESH_S)
                waited = True
            time.sleep(min(REFRESH_S / 4, STALE_S - age + 0.5))
            try:
                now = self._call("GET")
            except FileNotFoundError:  # released meanwhile
                return False
            if now["generation"] != seen["generation"]:
                raise self._refused(_describe(self._fs().cat_file(os.fspath(self.path))))
        logging.warning("taking over %s: %s last wrote it %.0f s ago", self.path, holder, age)
        try:  # over exactly the stale generation: of two runs taking it over at once, one wins
            self._generation = self._upload(str(seen["generation"]))
        except FileExistsError:
            raise self._refused(_describe(self._fs().cat_file(os.fspath(self.path)))) from None
        return True

    def _refresh(self) -> None:
        """Rewrite the lock every REFRESH_S while we hold it, only over our own generation: a run that took
        it over (after this one stalled for STALE_S) keeps it, and this one says so."""
        while not self._stop.wait(REFRESH_S):
            generation = self._generation
            if generation is None:
                return
            try:
                self._generation = self._upload(generation)
            except (FileExistsError, FileNotFoundError):
                logging.error("the lock %s was taken over by another run (this one did not refresh it for %.0f s): "
                              "two runs may now write %s", self.path, STALE_S, self.out_dir)
                self._generation = None
                return
            except Exception as e:  # noqa: BLE001 - a failed refresh is retried; the run goes on
                logging.warning("could not refresh the lock %s (%s); retrying in %.0f s", self.path, e, REFRESH_S)


def _age_s(info: dict[str, Any]) -> float:
    """Seconds since the lock object was last written: the service's `updated` time against this
    host's clock (Cloud VMs keep theirs by NTP; a skew of seconds is small against STALE_S)."""
    updated = dt.datetime.fromisoformat(info["updated"].replace("Z", "+00:00"))
    return max(0.0, time.time() - updated.timestamp())
