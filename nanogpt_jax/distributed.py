"""Start-up of multi-process (multi-host) runs, and the persistent compilation cache.

One JAX process runs per host (a TPU VM worker, a GPU node or one process per GPU, or several
processes on one machine in tests). Before anything touches a device, every process calls

    distributed.initialize(config)

which connects the processes through `jax.distributed.initialize` when there is more than one:

- explicitly, from `config.dist.{coordinator_address, num_processes, process_id}` or the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (the config
  wins), for a plain cluster: `coordinator_address` is `host:port` of process 0, reachable by all;
- automatically on a multi-host Cloud TPU VM slice and under SLURM (`srun`), where JAX reads the
  topology from the TPU metadata server or the SLURM_* variables itself.

After it, `jax.devices()` lists the devices of every process and `jax.local_devices()` this
process's; a jitted step runs as one program over all of them (SPMD), each process feeding its own
rows of the batch (`batches.TrainBatches`). On CPU the processes exchange arrays through gloo
(`jax_cpu_collectives_implementation`), which is how the tests run two processes on one machine.

`jax.distributed.initialize` also starts JAX's preemption service: a SIGTERM to any process is
relayed to all, and `preemption_sync_point(step)` then returns True on every process at the same
step, the step they all save (see train.py).

When a process is lost. Every process counts heartbeats in the coordination service that process 0
runs (`_Heartbeats`: a counter bumped each second in its key-value store, beside the training loop,
never in the step). A peer whose counter stands still for `dist.heartbeat_timeout_s` (default 30 s),
or a service that stops answering for as long (process 0 is gone), ends this process at once with
one line: which process was lost, the step reached, the last committed checkpoint, how to resume.
At once, because its main thread may be waiting in a collective that will never complete (gloo on
CPUs, NCCL on GPUs and the TPU interconnect do not notice a dead peer by themselves). JAX's own
heartbeats (its default reaction is a C++ abort with a dump of every thread, and its client's
callback hook cannot take Python code in jaxlib 0.10) are set to 3 x that timeout, at least 100 s,
as a last resort. A failure on one process that the others cannot see (a checkpoint save that
failed, a bad value) goes into the same store (`fail_everywhere`), and every process ends with the
same line within a second or two. A process that never joins makes the others exit after
`dist.initialization_timeout_s` with one line naming the missing processes.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax.errors import ConfigError, UserError

# The environment variables of a plain cluster (JAX itself reads JAX_COORDINATOR_ADDRESS).
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: must be an integer") from None


def explicit_params(config: ConfigDict) -> dict[str, Any]:
    """{coordinator_address, num_processes, process_id} from config.dist, else the environment
    (values None where neither says)."""
    dist = config.dist
    env = {"coordinator_address": os.environ.get(ENV_VARS["coordinator_address"]) or None,
           "num_processes": _env_int(ENV_VARS["num_processes"]),
           "process_id": _env_int(ENV_VARS["process_id"])}
    return {k: dist[k] if dist[k] is not None else env[k] for k in ENV_VARS}


def detected_cluster() -> str | None:
    """The name of the multi-process cluster JAX can configure itself in (a Cloud TPU VM slice,
    SLURM, Open MPI, ...), or None. Asks JAX's own cluster detection (`jax._src.clusters`, a
    private module, so any failure means "none"); a one-process allocation counts as none."""
    try:
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if env.opt_in_only_method or not env.is_env_present():
                continue
            return env.__name__ if env.get_process_count() > 1 else None
    except Exception as e:  # noqa: BLE001 - an API change must not stop a single-host run
        logging.warning("cluster detection failed (%s); set dist.coordinator_address, dist.num_processes and "
                        "dist.process_id for a multi-process run", e)
    return None


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
    """Keep compiled XLA programs in `path` (a folder or a gs:// URL) across runs: a restarted or
    resumed run with the same shapes skips compilation. Programs that compiled in under a second
    are not stored (jax_persistent_cache_min_compile_time_secs)."""
    if not path:
        return
    path = str(path)
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("persistent compilation cache: %s", path)


def _background_write_failed(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a library's writer thread (tensorboardX's event writer, an upload) that dies
    of an OSError (a full disk, a lost mount) would leave the training loop blocked on its queue. End
    the run now, every process of it, with one line; the traceback goes to the debug log."""
    if not isinstance(args.exc_value, OSError) or args.thread is threading.main_thread():
        return _default_excepthook(args)
    logging.debug("thread %s failed", args.thread.name if args.thread else "?",
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    where = _status_text()
    message = (f"writing in the background failed ({type(args.exc_value).__name__}: {args.exc_value}); check the "
               f"disk (space, permissions){'; ' + where if where else ''}; {_resume_advice()}")
    if is_multiprocess():
        fail_everywhere(message)
    _exit_now(message)


_default_excepthook = threading.excepthook


def exit_on_background_write_failure() -> None:
    """Make a library writer thread's OSError end the run in one line (`_background_write_failed`). For the
    command-line entry points: a program that imports the library keeps Python's own excepthook."""
    threading.excepthook = _background_write_failed


def initialize(config: ConfigDict) -> bool:
    """Set up this process of a run: the compilation cache, and `jax.distributed` if there are
    several processes. Call it before anything touches a device; calling it again does nothing.

    Returns:
        True when this process is one of several (jax.distributed is initialised).
    Raises:
        ConfigError: a bad dist.* value or JAX_* variable, or JAX's backend was already started
            (then jax.distributed can no longer be initialised).
    """
    enable_compilation_cache(config.get("compilation_cache_dir"))
    if jax.distributed.is_initialized():
        return True
    params = explicit_params(config)
    given = {k: v for k, v in params.items() if v is not None}
    if given:
        if params["num_processes"] == 1:
            return False  # said to be alone: nothing to connect
        how = "dist config / JAX_* environment"
    else:
        how = detected_cluster()
        if how is None:
            return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError("multi-process run: JAX's devices were used before distributed.initialize(config); "
                          "call it first (run_train.py does)")
    # CPU arrays cross processes through gloo (the default, none, cannot); GPUs and TPUs use their own links
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s): %s", how, given or "detected")
    timeout_s, init_s = int(config.dist.heartbeat_timeout_s), int(config.dist.initialization_timeout_s)
    # JAX's own detection aborts with a dump of every thread: ours (`_Heartbeats`) must come first
    timeouts = {"heartbeat_timeout_seconds": max(100, 3 * timeout_s), "initialization_timeout": init_s}
    _StderrFilter.install()  # before JAX's C++ client exists: its fatal reports must not reach the console
    # jaxlib aborts the process when the processes do not all join in time: say who, in one line
    _on_abort(lambda: _exit_now(_join_failure(params, init_s)))
    try:
        jax.distributed.initialize(**given, **timeouts)
    except (ValueError, TypeError) as e:  # e.g. a process id but no process count, outside a cluster
        raise ConfigError(f"multi-process run: {e} (set dist.coordinator_address, dist.num_processes and "
                          "dist.process_id)") from None
    except jax.errors.JaxRuntimeError:
        raise UserError(_join_failure(params, init_s)) from None
    logging.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    _Heartbeats(_client(), timeout_s).start()
    _on_abort(lambda: _lost(_why_jax_stopped()))
    return True


def _why_jax_stopped() -> str:
    """Who was lost, from what JAX's C++ runtime reported just before it aborted (kept off the console
    by `_StderrFilter`): a process the service found dead or disconnected, or the service itself gone."""
    me = jax.process_index()
    # The report is written before the abort, but the filter's thread may not have read it yet (a busy
    # host): wait for a line we understand, up to 3 s.
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        said = _StderrFilter.active.dropped if _StderrFilter.active else ""
        ids = re.search(r"stopped sending heartbeats\):?\s*([\d\s,]+)", said)
        lost = sorted({int(i) for i in re.findall(r"\d+", ids.group(1))} if ids else
                      {int(i) for i in re.findall(r"/task:(\d+)", said)} - {me})
        gone = re.search(r"Failed to send RPC to coordination service|Socket closed|Connection reset|"
                         r"failed to connect", said, re.IGNORECASE)
        if lost or gone or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if lost and (me == 0 or 0 not in lost):
        who = f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
        return f"{who} stopped (found by JAX's coordination service)"
    quiet = _Heartbeats.active.quietest() if _Heartbeats.active else None
    if gone or lost == [0] or (quiet is not None and quiet[0] == 0):
        return "process 0, which coordinates the run, is gone (JAX's coordination service cannot be reached)"
    if quiet is not None:  # JAX said nothing we could read: our own heartbeats tell who went quiet
        peer, seconds = quiet
        return f"process {peer} stopped (found by JAX's coordination service; its last heartbeat {seconds:.0f} s ago)"
    first = next((line for line in said.splitlines() if line.strip()), "no reason given")
    return f"JAX's distributed runtime stopped the run ({first[:200]})"


_abort_handler: Any = None  # the C-callable SIGABRT handler (kept alive here)


def _on_abort(act: Callable[[], None]) -> None:
    """Run `act` (which exits) when a C++ thread of JAX aborts the process. jaxlib's client aborts at once
    when process 0's coordination service goes away (its error polling), before our heartbeats can
    tell; a Python signal handler would never run (abort re-raises the signal), so this is a C one."""
    import ctypes
    import signal

    global _abort_handler
    try:
        libc = ctypes.CDLL(None)
        _abort_handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(lambda signum: act())
        libc.signal.restype = ctypes.c_void_p
        libc.signal(int(signal.SIGABRT), _abort_handler)
    except (OSError, AttributeError) as e:  # no C library to ask: JAX's abort stays
        logging.warning("cannot catch JAX's abort (%s): losing process 0 ends the others with a dump", e)


def _join_failure(params: dict[str, Any], timeout_s: int) -> str:
    """One line for a start-up that did not complete in time: who is missing (as far as this process can
    tell: process 0 waits for all others, the others wait for process 0), and what to check."""
    me, n, address = params.get("process_id"), params.get("num_processes"), params.get("coordinator_address")
    if me == 0:
        others = "process 1" if n == 2 else f"at least one of processes 1 to {n - 1}" if n else "another process"
        who = f"{others} of {n or '?'} did not join process 0"
    else:
        who = f"process {me if me is not None else '?'} could not join process 0 at {address}"
    return (f"multi-process start-up: {who} within dist.initialization_timeout_s={timeout_s} s; check that every "
            f"process was started with dist.num_processes={n} and its own dist.process_id, and that "
            f"dist.coordinator_address={address} is process 0's host:port, reachable from every host")


# ---- when a process is lost or fails ---------------------------------------------------------------

REPORT_WAIT_S = 3.0  # how long to wait for JAX's report of why it aborts to reach the filter
FAILURE_KEY = "nanogpt_jax/failure"  # the coordination service's key-value store: the first failure's line
_SEEN_PREFIX = "nanogpt_jax/failure_seen/"
_ALIVE_PREFIX = "nanogpt_jax/alive/"
_run_status: Callable[[], str] | None = None
_exit_lock = threading.Lock()
_final_message: str | None = None  # the line this process exits with, once decided
_failing_here = False  # fail_everywhere runs in this process


def report_status_with(status: Callable[[], str] | None) -> None:
    """Register what a fatal multi-process error says about the run, e.g. "at step 41; the last committed
    checkpoint is step 40 in out/checkpoints". The trainer calls it; None unregisters."""
    global _run_status
    _run_status = status


def _exit_now(message: str) -> NoReturn:
    """Print `error: message` (one line) and end the process at once: its main thread may be waiting in a
    collective that a lost process will never join, and JAX's exit handler would wait for that process too.
    Exit handlers (tensorboardX's flush, orbax's threads) do not run: nothing is printed after the line."""
    _decide(message)
    try:
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a full disk or closed stream must not stop the exit
        pass
    line = ("error: " + " ".join(_final_message.split()) + "\n").encode()
    if _StderrFilter.active is None or not _StderrFilter.active.last_line(line):
        os.write(2, line)
    os._exit(1)


class _StderrFilter:
    """Multi-process runs: this process's standard error (file descriptor 2) passes through a pipe and a
    thread that keeps JAX's C++ reports about the coordination service (a lost process, the C++ stack
    of the abort that follows) off the console and in the debug log. Everything else goes through as
    written; our own last line is written after all that came before it."""

    active: _StderrFilter | None = None
    # C++ log records (absl's format) from the distributed runtime, and what follows them
    _NOISE = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ (coordination_service\w*|preemption_\w+|client|distributed\w*|"
                        r"grpc\w*)\.(cc|h):\d+\]|\*\*\* Check failure stack trace")
    _RECORD = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]|error: |\[Gloo\]")

    def __init__(self) -> None:
        self.console = os.dup(2)
        self.read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.dropping = False
        self.dropped = ""  # the last of what was kept off the console: what JAX said before aborting
        self.done = threading.Event()
        self.final: bytes | None = None

    @classmethod
    def install(cls) -> None:
        if cls.active is None:
            cls.active = cls()
            threading.Thread(target=cls.active._pump, name="nanogpt_jax-stderr", daemon=True).start()
            # a crash (SIGSEGV) kills the pump with the process: Python's report of it goes to the console itself
            faulthandler.enable(file=cls.active.console, all_threads=True)

    def last_line(self, line: bytes) -> bool:
        """Write `line` after everything already written to stderr; True once it is on the console."""
        self.final = line
        os.write(2, b"\x00nanogpt-final\n")  # a marker: the pump writes `line` when it reaches it
        return self.done.wait(2.0)

    def _pump(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._forward(raw + b"\n")

    def _forward(self, raw: bytes) -> None:
        if raw == b"\x00nanogpt-final\n":
            os.write(self.console, self.final or b"")
            self.done.set()
            return
        text = raw.decode(errors="replace")
        if self._NOISE.match(text):
            self.dropping = True
        elif self._RECORD.match(text):
            self.dropping = False
        if self.dropping:
            self.dropped = (self.dropped + text)[-4000:]
            logging.debug("jax (C++): %s", text.rstrip())
        else:
            os.write(self.console, raw)


def _status_text(timeout_s: float = 5.0) -> str:
    """The registered status, asked in a thread of its own: it reads the checkpoint list, which a
    blocked main thread may hold; the line goes out after `timeout_s` with or without it."""
    if _run_status is None:
        return ""
    answer: list[str] = []

    def ask() -> None:
        try:
            answer.append(_run_status())
        except Exception:  # noqa: BLE001 - the line matters more than its details
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answer[0] if answer else ""


def _resume_advice() -> str:
    return ("restart every process with the same command and --config.init_from=resume (with this or another "
            "number of processes) to continue from the last committed checkpoint")


def _lost(who: str) -> NoReturn:
    where = _status_text()
    _exit_now(f"multi-process run: {who}{'; ' + where if where else ''}; {_resume_advice()}")


def is_multiprocess() -> bool:
    """True in a run of several processes connected by `initialize` (without starting a backend)."""
    return jax.distributed.is_initialized() and _client() is not None


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def fail_everywhere(message: str) -> NoReturn:
    """End every process of the run with the same one-line error, then this one.

    The first failure's line is written to the coordination service's key-value store, where every
    process's watcher finds it within a second; this process waits (up to 10 s) until the others have
    seen it, since process 0's exit takes the store with it. A later failure on another process yields
    to the first one's line. In a single-process run it is `_exit_now(message)`.
    """
    if not is_multiprocess():
        _exit_now(message)
    client = _client()
    global _failing_here
    _failing_here = True  # this process's watcher must not act on the line it is about to write
    line = f"process {jax.process_index()}: {' '.join(message.split())}"
    try:
        client.key_value_set(FAILURE_KEY, line)
    except Exception:  # noqa: BLE001 - already set: another process failed first; report that
        line = _try_get(client, FAILURE_KEY) or line
    _decide(line)
    _acknowledge_and_wait(client, seconds=10.0)
    if jax.process_index() == 0:
        time.sleep(0.5)  # the others exit on their own once they have seen it; the store goes with this one
    _exit_now(line)


def _decide(message: str) -> None:
    """Fix the line this process exits with: the first thread to decide wins, so a second reason (process
    0 gone, after the failure that made it exit) does not replace the first one's line."""
    global _final_message
    with _exit_lock:
        _final_message = _final_message or message


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND, or the service is gone
        return None


def _acknowledge_and_wait(client: Any, seconds: float) -> None:
    """Say this process has seen the failure; wait until all have (or `seconds` pass)."""
    try:
        client.key_value_set(f"{_SEEN_PREFIX}{jax.process_index()}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if len(client.key_value_dir_get(_SEEN_PREFIX)) >= jax.process_count():
                return
        except Exception:  # noqa: BLE001 - the service is gone: nobody is left to wait for
            return
        time.sleep(0.2)


class _Heartbeats:
    """Every process's watch on the others, beside the training loop (it never waits for a step).

    A poller thread bumps this process's counter in the coordination service's key-value store and
    reads everyone's (two small requests a second), and looks for a failure line (`fail_everywhere`).
    A judge thread, which makes no request and so cannot be blocked by one, ends the process with one
    line when a peer's counter has not moved for `timeout_s`, or when process 0's service has not
    answered for that long. Counters, not clocks: hosts' clocks need not agree. JAX's own heartbeats
    (set to 3 x timeout_s, at least 100 s) stay as the last resort; they abort with a dump."""

    active: _Heartbeats | None = None  # this process's watch, once started

    def __init__(self, client: Any, timeout_s: float, poll_s: float = 1.0):
        self.client, self.timeout_s, self.poll_s = client, timeout_s, poll_s
        self.me, self.n = jax.process_index(), jax.process_count()
        now = time.monotonic()
        self.last_answer = now  # when the service last answered
        self.counters: dict[int, tuple[str, float]] = {i: ("", now) for i in range(self.n) if i != self.me}
        self.stopped = threading.Event()
        self.poller: threading.Thread | None = None

    def quietest(self) -> tuple[int, float] | None:
        """(peer, seconds) for the peer whose counter has stood still longest, if that is more than two
        polls (a live peer's moves every poll); None when every peer is beating."""
        if not self.counters:
            return None
        peer, (_, seen) = min(self.counters.items(), key=lambda item: item[1][1])
        seconds = time.monotonic() - seen
        return (peer, seconds) if seconds > 2 * self.poll_s + 0.5 else None

    def start(self) -> None:
        _Heartbeats.active = self
        self.poller = threading.Thread(target=self._poll, name="nanogpt_jax-heartbeat-poll", daemon=True)
        self.poller.start()
        threading.Thread(target=self._judge, name="nanogpt_jax-heartbeat-judge", daemon=True).start()
        # atexit runs its handlers last-registered first: this one before JAX's, which shuts the client down.
        # A request in flight on a client being shut down crashes the process (SIGSEGV at the end of a good run).
        atexit.register(self.stop)

    def stop(self, timeout_s: float = 10.0) -> None:
        """End both threads; returns once no request of ours is in flight (or after `timeout_s`)."""
        self.stopped.set()
        if self.poller is not None and self.poller is not threading.current_thread():
            self.poller.join(timeout_s)

    def _poll(self) -> None:
        beat = 0
        while not self.stopped.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"{_ALIVE_PREFIX}{self.me}", str(beat), allow_overwrite=True)
                alive = self.client.key_value_dir_get(_ALIVE_PREFIX)
                failure = _try_get(self.client, FAILURE_KEY)
            except Exception:  # noqa: BLE001 - the service did not answer: the judge counts the silence
                self.stopped.wait(self.poll_s)
                continue
            now = self.last_answer = time.monotonic()
            for key, value in alive:
                peer = int(key.rsplit("/", 1)[-1])
                if peer in self.counters and self.counters[peer][0] != value:
                    self.counters[peer] = (value, now)
            if failure is not None and not _failing_here:
                _decide(failure)
                _acknowledge_and_wait(self.client, seconds=2.0)
                _exit_now(failure)
            self.stopped.wait(self.poll_s)

    def _judge(self) -> None:
        while not self.stopped.wait(self.poll_s / 2):
            now = time.monotonic()
            if now - self.last_answer > self.timeout_s:
                _lost(f"process 0, which coordinates the run, has not answered for {self.timeout_s:.0f} s "
                      "(dist.heartbeat_timeout_s)")
            silent = sorted(p for p, (_, seen) in self.counters.items() if now - seen > self.timeout_s)
            if silent:
                _lost(f"process{'es' if len(silent) > 1 else ''} {', '.join(map(str, silent))} of {self.n} sent no "
                      f"heartbeat for {self.timeout_s:.0f} s (dist.heartbeat_timeout_s): lost")


def preemption_sync_point(step: int) -> bool:
    """True on every process at the same step once any process has received SIGTERM (a
    preemption notice): save that step, then exit. Call it at every step with the same step
    numbers on all processes. Always False in a single-process run."""
    if jax.process_count() == 1:
        return False
    return multihost_utils.reached_preemption_sync_point(step)


def _check(config: ConfigDict) -> None:
    """config.validate's checks of the dist section."""
    if "dist" not in config:
        return
    d = config.dist
    if d.num_processes is not None and d.num_processes < 1:
        raise ConfigError(f"dist.num_processes={d.num_processes}: must be >= 1")
    if d.process_id is not None:
        n = d.num_processes
        if d.process_id < 0 or (n is not None and d.process_id >= n):
            raise ConfigError(f"dist.process_id={d.process_id}: must be in [0, dist.num_processes="
                              f"{n if n is not None else '?'})")
    for key in ("heartbeat_timeout_s", "initialization_timeout_s"):
        if d.get(key) is not None and (not isinstance(d[key], int) or d[key] < 1):
            raise ConfigError(f"dist.{key}={d[key]!r}: must be a whole number of seconds >= 1")
    if d.coordinator_address is not None and not re.fullmatch(r"\S+:\d+", d.coordinator_address):
        raise ConfigError(f"dist.coordinator_address={d.coordinator_address!r}: must be host:port of process 0, "
                          "e.g. 10.0.0.2:1234")


config_lib.EXTRA_CHECKS.append(_check)
