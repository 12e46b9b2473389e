"""Out of device memory: XLA's RESOURCE_EXHAUSTED, injected, is one line naming what to lower, for every command.

Each command runs as a user runs it (run_*.py in a subprocess), with one change: at the point where XLA raises
RESOURCE_EXHAUSTED on an accelerator (compiling the command's big computation, as a TPU does, or running it, as a
GPU does) the real XLA error type, `jax.errors.JaxRuntimeError`, is raised instead. So nothing here depends on
this machine's memory, on vm.overcommit_memory, or on the OOM killer. (test_run_folder.py checks the memory
estimator's refusal before compiling, which needs no allocation either.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

# Runs sys.argv[1] as __main__ (as `python run_x.py ...` would), with XLA failing the computation OOM_NAME:
# at its compilation (OOM_AT=compile) or at its first run (OOM_AT=execute). Both patched functions are jax
# internals (no public API sees every jitted computation: jax.jit's calls never pass through jax.stages);
# they are checked before patching, so an upstream rename fails here, loudly. Every computation compiled or
# run is listed in OOM_LOG, and the injection is recorded there ("injected ..."), for the test to check.
INJECT = r"""
import os, re, runpy, sys

import jax
from jax._src import compiler
from jax._src.interpreters import pxla

at, name, log = os.environ["OOM_AT"], os.environ["OOM_NAME"], os.environ["OOM_LOG"]
assert callable(getattr(compiler, "backend_compile_and_load", None)), "jax moved backend_compile_and_load"
assert callable(getattr(pxla, "ExecuteReplicated", None)), "jax moved ExecuteReplicated"
# a persistent compilation cache hit (JAX_COMPILATION_CACHE_DIR, compilation_cache_dir) would skip the compile
jax.config.update("jax_enable_compilation_cache", False)
MESSAGE = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.\n"
           "BufferAssignment OOM Debugging.\nBufferAssignment stats: (the rest of XLA's report)")


def key(computation):  # the function's name in the compiled module's name (jit__lambda) or in jit(<lambda>)
    return re.sub(r"[\W_]", "", computation.removeprefix("jit"))


def seen(phase, computation):
    inject = phase == at and key(computation) == key(name)
    with open(log, "a") as f:
        f.write(f"{'injected' if inject else phase} {computation}\n")
    if inject:
        raise jax.errors.JaxRuntimeError(MESSAGE)


compile_and_load = compiler.backend_compile_and_load


def backend_compile_and_load(backend, module, *args, **kwargs):
    module_name = str(module.operation.attributes["sym_name"]).strip('"')  # jit_<function name>
    seen("compile", module_name)
    return compile_and_load(backend, module, *args, **kwargs)


execute = pxla.ExecuteReplicated.__call__


def execute_replicated(self, *args):  # the first call of each jitted shape, jax.jit's and AOT's (Compiled)
    seen("execute", self.name)
    return execute(self, *args)


compiler.backend_compile_and_load = backend_compile_and_load
pxla.ExecuteReplicated.__call__ = execute_replicated
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TINY = ("--config", str(ROOT / "configs/tiny.py"))


def run_out_of_memory(script: str, at: str, name: str, *args: str, cwd):
    """`python <script> <args>` from `cwd`, with XLA out of memory at the computation `name` (a jitted function's
    name); returns the CompletedProcess after checking that the injection fired."""
    log = cwd.parent / f"oom-{script}-{at}.log"
    env = cli_env(OOM_AT=at, OOM_NAME=name, OOM_LOG=str(log))
    done = subprocess.run([sys.executable, "-c", INJECT, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    seen = log.read_text().splitlines() if log.exists() else []
    assert any(line.startswith("injected ") for line in seen), (
        f"no computation named {name!r} was {at}d; seen: {seen}\n{done.stderr[-3000:]}")
    return done


def the_error_line(done) -> str:
    """Exit status 1, no traceback, and exactly one 'error: ' line, the last one (INFO lines may come before)."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], done.stderr[-3000:]
    return errors[0]


def check_out_of_memory_line(line: str, *keys: str) -> None:
    assert line.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to "
                           "allocate 68719476736 bytes.); "), line
    assert "BufferAssignment" not in line, line  # XLA's first line only
    assert "python -m nanogpt_jax.memory" in line, line
    for key in keys:
        assert key in line, (key, line)


def files(folder) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime in ns)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def cwd(tmp_path):
    """An empty working folder: a command's default output paths (bench/, out-tiny/) would land here."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    yield folder
    assert not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


@pytest.fixture
def run_copy(char_eval_run, tmp_path):
    """A copy of the trained tiny run (conftest), so eval's default report path (out_dir/eval.json) can be
    checked without any risk to the shared run; yields it, then checks nothing in it changed."""
    copy = tmp_path / "run"
    shutil.copytree(char_eval_run, copy)
    before = files(copy)
    yield copy
    assert files(copy) == before


@pytest.mark.parametrize("computation", [
    "<lambda>",  # step.init_state's jitted init: a model whose state does not fit (train.py's _Run)
    "step",  # the train step, where the activations go (train.py's loop)
])
def test_train(token_data, tmp_path, cwd, computation):
    """run_train.py names the run's own values (memory.advice), not the generic advice; no out_dir."""
    out = tmp_path / "out"
    done = run_out_of_memory("run_train.py", "compile", computation, *TINY, f"--config.data.data_dir={token_data}",
                             f"--config.out_dir={out}", "--config.train.batch_size=16", cwd=cwd)
    line = the_error_line(done)
    check_out_of_memory_line(line, "train.batch_size=16", "train.gradient_accumulation_steps=1",
                             "model.block_size=32", "model.remat=full", "mesh.fsdp=1")
    assert "bench.batch_sizes" not in line, line  # cli.main's generic advice: train's own came first
    assert not out.exists() and done.stdout == ""


def test_bench(token_data, cwd):
    """run_bench.py (train mode: the AOT lower().compile() of the train step); no bench/train.json."""
    done = run_out_of_memory("run_bench.py", "compile", "step", *TINY, f"--config.data.data_dir={token_data}", cwd=cwd)
    check_out_of_memory_line(the_error_line(done), "bench.batch_sizes")
    assert done.stdout == ""  # no table; `cwd` checks that no bench/ folder was written


@pytest.mark.parametrize("at", ["compile", "execute"])
def test_eval(token_data, run_copy, cwd, at):
    """run_eval.py on a training run: no eval.json / eval.md in its out_dir (`run_copy` checks it is untouched)."""
    done = run_out_of_memory("run_eval.py", at, "score", *TINY, f"--config.data.data_dir={token_data}",
                             f"--config.out_dir={run_copy}", "--config.init_from=resume", cwd=cwd)
    check_out_of_memory_line(the_error_line(done), "eval.batch_size")
    assert done.stdout == ""


@pytest.mark.parametrize("at", ["compile", "execute"])
def test_sample(token_data, run_copy, cwd, at):
    """run_sample.py on a training run: the prefill of the batch fails; no sampled text."""
    done = run_out_of_memory("run_sample.py", at, "_prefill", *TINY, f"--config.data.data_dir={token_data}",
                             f"--config.out_dir={run_copy}", "--config.init_from=resume",
                             "--config.sample.prompt=ABC", "--config.sample.num_samples=4", cwd=cwd)
    check_out_of_memory_line(the_error_line(done), "sample.num_samples")
    assert done.stdout == "ABC"  # the prompt is echoed before generating (sample.sample); nothing after it
