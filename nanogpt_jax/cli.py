"""What every `run_*.py` shares: the `--config` flag, one-line errors, and absl logging.

    # run_sample.py
    from nanogpt_jax import cli
    cli.main(lambda config: sample.sample_from_config(config))

`main` parses `--config path.py[:variant]` and `--config.key=value` overrides with ml_collections
(locked, so an unknown key is an error), validates the result, starts `jax.distributed` when the
run has several processes (and the compilation cache), and calls the function. A problem
with the input (`UserError`, a bad flag, a config file that cannot be loaded) prints one line,
`error: ...`, to stderr and exits with status 1; nothing else is printed.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from nanogpt_jax import distributed
from nanogpt_jax.config import validate
from nanogpt_jax.errors import UserError, fail, out_of_memory_is_a_user_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/owt.py or configs/owt.py:gpt2-medium; override keys with "
    "--config.key=value.", lock_config=True)


def _config_file_error(text: str) -> str | None:
    """A readable line for a --config file that cannot be loaded (missing, or raising on import), else None."""
    folder = re.search(r"Is a directory: '([^']+)'", text)
    if folder:
        return f"--config {folder.group(1)!r} is a folder; pass one of its files, e.g. --config configs/tiny.py"
    missing = re.search(r"No such file or directory: '([^']+)'", text)
    if missing:
        return f"no config file {missing.group(1)!r}; pass one of configs/*.py, e.g. --config configs/tiny.py"
    if "Traceback (most recent call last)" in text:  # the config file raised: the last line is its message
        return text.strip().splitlines()[-1].split(": ", 1)[-1]
    return None


def _flag_error_message(e: BaseException) -> str:
    """Turn what absl / ml_collections raise for a bad flag into a one-line message naming the key."""
    text = str(e.args[0]) if isinstance(e, KeyError | AttributeError) and e.args else str(e)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError's quotes, not the message's own
        text = text[1:-1]
    text = text.replace("\\n", " ").replace("\\'", "'")
    file_error = _config_file_error(text)
    if file_error:
        return file_error
    unknown = re.search(r"Unknown command line flag '(\w+)([\w.]*)", text)
    if unknown and unknown.group(1) == "config":  # --config.key=value is a flag only once --config is given
        return (f"--config FILE is missing: --config{unknown.group(2)} overrides a config file's key; pass the "
                "file first, e.g. --config configs/tiny.py (see configs/)")
    if unknown:
        return (f"unknown flag --{unknown.group(1)}; settings are config keys: --config.<section>.<key>=value, "
                f"e.g. --config.train.max_iters=100 (see configs/default.py)")
    key = re.search(r"--(config[\w.]*)", " ".join(sys.argv))
    if isinstance(e, KeyError | AttributeError):
        bad = re.match(r"'?([\w]+)'?", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        name = bad.group(1) if bad else text
        msg = f"unknown config key {name!r}"
        return msg + (f" (did you mean {hint.group(1)!r}?)" if hint else " (see configs/default.py for every key)")
    return text if key is None or key.group(1) in text else f"{key.group(1)}: {text}"


# Libraries whose INFO lines are about their own machinery (orbax logs a dozen per checkpoint);
# their warnings and errors still show. --verbosity=1 (absl's debug level) shows everything.
_QUIET_PACKAGES = ("/orbax/", "/jax/_src/", "/absl/")


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
    if "/orbax/" in record.pathname and str(record.msg).startswith("Given directory is read only"):
        return False  # we open checkpoints read-only on purpose (sampling, evaluation)
    if logging.get_verbosity() >= logging.DEBUG:
        return True
    if "/gcsfs/" in record.pathname and record.exc_info:
        return False  # a request out of retries, with its traceback: our one line says what failed
    if record.levelno >= std_logging.WARNING:
        return True
    return not any(p in record.pathname for p in _QUIET_PACKAGES)


def _quiet_unraisable(unraisable: Any) -> None:
    """sys.unraisablehook: after an orbax save into a bucket failed, tensorstore's writes still in flight
    call back into the save's event loop, which orbax has closed, and report each `RuntimeError: Event
    loop is closed` as unraisable (dozens of bare tracebacks before our line). Those go to the debug
    log; anything else is Python's default report."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        logging.debug("after a failed save: %s: %s", unraisable.exc_type.__name__, unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - anything raised while parsing flags comes from the command line
        fail(_flag_error_message(e))


def load_config() -> ConfigDict:
    """The parsed `--config`, validated; raises UserError naming the bad key."""
    config = _CONFIG.value
    if config is None:
        raise UserError("no config given: pass --config configs/<name>.py (see configs/)")
    if not isinstance(config, ConfigDict):  # ml_collections defers a file-load failure to first use
        try:
            config.unlock()
        except Exception as e:  # noqa: BLE001 - its message is the load error
            raise UserError(f"cannot load --config: {_config_file_error(str(e)) or e}") from None
    validate(config)
    return config


def _fail_without_waiting(message: str, grace_seconds: float = 5.0) -> None:
    """`fail(message)`, but never left hanging at exit by a library's worker thread.

    Python waits for every non-daemon thread before it exits. After a checkpoint save that failed
    in the background, orbax leaves threads waiting for a signal that never comes, so the process
    would print its error and then never end. Threads get `grace_seconds` to finish (0: an
    interrupt); then the process exits after the error line and a flush of the logs, without
    running exit handlers (tensorboardX's would print tracebacks after a full disk).
    """
    deadline = time.monotonic() + grace_seconds
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            try:  # the plain Thread.join: orbax's threads override join() to raise on a timeout
                threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a thread that cannot be joined is left behind below
                pass
    # then end without exit handlers either: after a full disk, tensorboardX's would add tracebacks after the line
    try:
        fail(message)
    except SystemExit:
        try:
            logging.flush()
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - a full disk must not turn the exit into a traceback
            pass
        os._exit(1)


# For entry points without advice of their own (run_train.py's names the run's exact values)
_MEMORY_ADVICE = ("lower the batch size this command uses (train.batch_size or bench.batch_sizes, eval.batch_size, "
                  "sample.num_samples) or model.block_size, or set model.remat=full or shard with mesh.fsdp; size a "
                  "training step first: python -m nanogpt_jax.memory --config <this config>")


def main(fn: Callable[[ConfigDict], object]) -> None:
    """Run `fn(config)` as an absl app with one-line errors for bad input."""

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {' '.join(argv[1:])!r}; settings go in --config.key=value")
        logging.use_absl_handler()
        logging.get_absl_handler().addFilter(_quiet_libraries)
        sys.unraisablehook = _quiet_unraisable
        try:
            config = load_config()
            distributed.exit_on_background_write_failure()  # e.g. tensorboardX's writer on a full disk
            distributed.initialize(config)  # multi-host runs and the compile cache, before any device is used
            with out_of_memory_is_a_user_error(_MEMORY_ADVICE):
                fn(config)
        except UserError as e:
            if distributed.is_multiprocess():  # the others may be waiting for this one: end them too, same line
                distributed.fail_everywhere(str(e))
            _fail_without_waiting(str(e))
        except KeyboardInterrupt:  # no grace: XLA may still be computing, and tearing the interpreter down
            _fail_without_waiting("interrupted", grace_seconds=0.0)  # under it can crash (seen in run_bench.py)

    app.run(_main, flags_parser=_parse_flags)
