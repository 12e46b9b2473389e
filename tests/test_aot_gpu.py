"""Compiling the train step for NVIDIA GPUs on this CPU machine: the CUDA plugin, no GPU, no driver
(`make test` installs the gpu-aot extra in .venv/cuda_aot and sets NANOGPT_CUDA_AOT_PATH)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from nanogpt_jax import targets
from nanogpt_jax.errors import ConfigError

CUDA_AOT = os.environ.get(targets.CUDA_AOT_ENV) or str(Path(sys.prefix, "cuda_aot"))
needs_cuda_compiler = pytest.mark.skipif(
    not Path(CUDA_AOT, "jax_plugins").is_dir(),
    reason="needs the CUDA compiler: `make test` installs the gpu-aot extra, sets NANOGPT_CUDA_AOT_PATH")

H100 = targets.TARGETS_DIR / "h100_sxm_80gb.txtpb"
# configs/tiny.py as a GPU would train it: bfloat16 (cuDNN's fused attention has no float32), block 128
TINY_GPU = ["--config", str(ROOT / "configs/tiny.py"), "--config.model.dtype=bfloat16",
            "--config.model.block_size=128", "--config.model.n_embd=64", "--config.model.vocab_size=512",
            "--config.train.batch_size=4", "--config.mesh.data=2"]


@pytest.mark.parametrize("name,kind,n,shape", [
    ("h100-1", "h100", 1, "1x1x1"),
    ("h100-8", "h100", 8, "1x1x8"),
    ("8xH100", "h100", 8, "1x1x8"),
    ("h100-16", "h100", 16, "1x2x8"),  # two hosts of 8
    ("H200-8", "h200", 8, "1x1x8"),
    ("a100-40g-8", "a100-40g", 8, "1x1x8"),
    ("gpu-4", "gpu", 4, "1x1x4"),
])
def test_gpu_names(name, kind, n, shape):
    assert targets.parse_gpu_name(name) == (kind, n, shape)


@pytest.mark.parametrize("name,says", [
    ("h100-12", "use 1 to 8 (one host) or a multiple of 8"),
    ("h100-0", "use 1 to 8"),
    ("x100-8", "not a TPU slice or GPU topology"),
    ("gpu-8", "a generic GPU needs its description: --gpu_target_config=FILE"),
])
def test_bad_gpu_topology_is_one_line(name, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        targets.topology(name)
    assert "\n" not in str(e.value)


def test_memory_fraction_follows_jax(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    assert targets.gpu_memory_fraction() == 0.75
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert targets.gpu_memory_fraction() == 0.9
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    assert targets.gpu_memory_fraction() == 1.0
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "2")
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='2'"):
        targets.gpu_memory_fraction()


def test_every_shipped_target_names_its_memory_and_gpu():
    for kind, file in targets.GPU_TARGETS.items():
        if file is None:
            continue
        text = (targets.TARGETS_DIR / file).read_text()
        assert "device_memory_size:" in text and 'platform_name: "CUDA"' in text, kind
        assert kind.split("-")[0].upper() in text.split("device_description_str:")[1], kind


def _aot(*args, env=None):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "nanogpt_jax.aot", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu",
                                                           **(env or {})))


@needs_cuda_compiler
@pytest.mark.slow
def test_tiny_config_compiles_for_h100s_with_cudnn_attention(tmp_path):
    """The CLI on the tiny config for 2 H100s: cuDNN's fused attention is in the compiled HLO, the
    memory report is there, and a GPU gives the step JAX's 75% of its 79.1 GiB."""
    out = tmp_path / "aot.json"
    done = _aot(*TINY_GPU, "--topology=h100-2", f"--json={out}", env={targets.CUDA_AOT_ENV: CUDA_AOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attention: cudnn" in done.stdout and "cudnn_attention calls" in done.stdout, done.stdout
    assert "note: deviceless GPU compile: no autotuning" in done.stdout
    assert "cuda drivers" not in done.stderr.lower()  # the plugin's start-up lines are kept off the console
    r = json.loads(out.read_text())
    assert (r["platform"], r["devices"], r["jax_topology"], r["hosts"]) == ("gpu", 2, "1x1x2", 1)
    assert r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["fits"]
    assert r["hbm_bytes"] == int(0.75 * 84942979072)
    # forward and backward of each of the 2 layers: a cuDNN fused-attention custom call each at least
    assert r["kernels"]["cudnn_attention"] >= 4 and r["implementations"]["attention"] == "cudnn"
    mem = r["memory"]
    assert mem["argument_size_in_bytes"] > 0 and mem["temp_size_in_bytes"] > 0
    assert r["peak_flops"] == pytest.approx(989.4e12)  # H100 SXM bf16, the datasheet's dense figure


@needs_cuda_compiler
@pytest.mark.slow
def test_own_target_config_and_memory_fraction(tmp_path):
    """--gpu_target_config compiles for a description of your own (here: an H100 with 256 MiB), and
    XLA_PYTHON_CLIENT_MEM_FRACTION sets the share of it the step may use; too small is a no-fit, exit 1."""
    small = tmp_path / "small.txtpb"
    small.write_text(H100.read_text().replace("device_memory_size: 84942979072", f"device_memory_size: {2**28}"))
    out = tmp_path / "aot.json"
    done = _aot(*TINY_GPU, "--topology=gpu-2", f"--gpu_target_config={small}", f"--json={out}",
                "--config.train.batch_size=512",
                env={targets.CUDA_AOT_ENV: CUDA_AOT, "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})
    r = json.loads(out.read_text())
    assert r["hbm_bytes"] == 2**27 and r["target_config"] == str(small)
    assert done.returncode == 1 and not r["fits"], done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step does not fit gpu-2's 0.1 GiB per GPU"), done.stderr[-2000:]


@needs_cuda_compiler
def test_a_target_config_that_does_not_parse_is_one_line(tmp_path):
    bad = tmp_path / "bad.txtpb"
    bad.write_text(H100.read_text().replace("core_count: 132", "core_count: 132\n  warp_drive: 9"))
    done = _aot(*TINY_GPU, "--topology=h100-2", f"--gpu_target_config={bad}", env={targets.CUDA_AOT_ENV: CUDA_AOT})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: --gpu_target_config='{bad}': XLA cannot parse it (")
    assert 'no field named "warp_drive"' in lines[0]


def test_a_missing_cuda_compiler_is_one_line():
    done = _aot(*TINY_GPU, "--topology=h100-2", env={targets.CUDA_AOT_ENV: "/nonexistent"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert "compiling for NVIDIA GPUs needs the CUDA compiler" in lines[0] and "make install-aot" in lines[0]


@needs_cuda_compiler
def test_cpu_runs_do_not_try_cuda():
    """With the compiler installed as make test installs it, a CPU-only program (here: JAX's start-up,
    the aot module's import and a computation) prints nothing about CUDA: JAX never sees the plugin."""
    code = "import jax, nanogpt_jax.aot; print(jax.devices(), float(jax.numpy.ones(3).sum()))"
    # let JAX look for accelerators (and leave libtpu out of it: that is another story)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(env, **{targets.CUDA_AOT_ENV: CUDA_AOT}))
    assert done.returncode == 0 and "CpuDevice" in done.stdout, done.stderr[-2000:]
    assert "cuda" not in done.stderr.lower() and "gpu" not in done.stderr.lower(), done.stderr
