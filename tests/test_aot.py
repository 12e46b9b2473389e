"""Compiling the train step for a TPU slice on this CPU machine (libtpu; `make test` installs it)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from nanogpt_jax import targets
from nanogpt_jax.errors import ConfigError

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"),
    reason="needs the TPU compiler: `make test` installs libtpu, sets TPU_LIBRARY_PATH")


@pytest.mark.parametrize("name,jax_name,devices,hbm_gib", [
    ("v5e-8", "v5e:2x4", 8, 16),
    ("v5litepod-4", "v5e:2x2", 4, 16),
    ("v4-8", "v4:2x2x1", 4, 32),  # 4 chips of 2 TensorCores, one JAX device each (megacore)
    ("v4-32", "v4:2x2x4", 16, 32),
    ("v5p-8", "v5p:2x2x1", 4, 95),
    ("v6e:2x2", "v6e:2x2", 4, 32),
])
@needs_libtpu
def test_topologies(name, jax_name, devices, hbm_gib):
    topo = targets.topology(name)
    assert (topo.jax_name, len(topo.devices), topo.hbm_bytes) == (jax_name, devices, hbm_gib * 2**30)
    assert topo.devices[0].platform == "tpu"


@pytest.mark.parametrize("name", ["v5e-7", "v9-8", "x100-8"])
def test_bad_topology_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"--topology={name!r}"):
        targets.topology(name)


def _aot_cli(*args, json_path):
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_jax.aot", f"--json={json_path}", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                 JAX_PLATFORMS="cpu"))


@needs_libtpu
def test_a_step_that_does_not_fit_is_reported_and_exits_1(tmp_path):
    """gpt2-xl data parallel on v5e-8: 12 bytes of state per parameter alone are 17 GiB per 16 GiB chip.
    XLA refuses it quickly (before scheduling), so this is cheap."""
    out = tmp_path / "aot.json"
    done = _aot_cli("--config", str(ROOT / "configs/finetune_shakespeare.py"), "--topology=v5e-8",
                    "--config.model.dtype=bfloat16", "--config.model.scan_layers=True", "--config.model.remat=full",
                    "--config.mesh.data=8", "--config.train.batch_size=8", json_path=out)
    assert done.returncode == 1
    assert "does NOT fit: XLA could not compile it (RESOURCE_EXHAUSTED" in done.stdout, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step does not fit v5e-8's 16.0 GiB per chip (XLA: RESOURCE_EXHAUSTED")
    r = json.loads(out.read_text())
    assert r["memory"] is None and not r["fits"] and r["estimate"]["total"] > 16 * 2**30


@needs_libtpu
@pytest.mark.slow
def test_tiny_config_compiles_for_a_tpu_and_agrees_with_the_estimator(tmp_path):
    """The CLI on configs/tiny.py widened to TPU-friendly sizes (each chip's slice of a weight a
    multiple of 128 wide: the TPU pads narrower ones), fully sharded over a v5e-4: it compiles, it
    fits, and its memory is what the estimator says."""
    out = tmp_path / "aot.json"
    args = {"model.n_layer": 2, "model.n_head": 4, "model.n_embd": 512, "model.block_size": 256,
            "model.vocab_size": 2048, "model.dtype": "bfloat16", "train.batch_size": 16,
            "train.gradient_accumulation_steps": 2, "mesh.data": 1, "mesh.fsdp": 4}
    done = _aot_cli("--config", str(ROOT / "configs/tiny.py"), "--topology=v5e-4",
                    *[f"--config.{k}={v}" for k, v in args.items()], json_path=out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fits: " in done.stdout and "compile " in done.stdout, done.stdout
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["fits"]
    assert r["tokens_per_step"] == 2 * 16 * 256 and r["model"]["dtype"] == "bfloat16"
    mem, est = r["memory"], r["estimate"]
    # the step's arguments: a quarter of the parameters and of both AdamW moments each, and the batch
    assert mem["argument_size_in_bytes"] == pytest.approx(est["params"] + est["opt_state"] + est["batch"], rel=0.05)
    # temporaries this small stay in the chip's on-chip memory: HBM sees at most the estimate
    temporaries = est["grads"] + est["weights"] + est["activations"] + est["logits"]
    assert 0 <= mem["temp_size_in_bytes"] <= temporaries
    # XLA's FLOPs per chip count the micro-step loop's body once: x2 gives the step, which is the model's
    # 6N + 12LdT plus what that leaves out (softmax, LayerNorms, AdamW)
    assert 0.9 < 2 * r["flops"] / r["model_flops"] < 1.5


@needs_libtpu
def test_sweep_finds_the_largest_per_chip_batch_that_fits(tmp_path):
    """--sweep compiles each per-chip batch until one does not fit (a huge one, refused at once) and
    names the largest that fits, with the attention and loss that were compiled."""
    out = tmp_path / "sweep.json"
    done = _aot_cli("--config", str(ROOT / "configs/tiny.py"), "--topology=v5e-4", "--sweep=4,1,100000,2",
                    "--config.model.dtype=bfloat16", "--config.model.block_size=128", "--config.model.vocab_size=512",
                    "--config.mesh.data=4", json_path=out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "largest per-chip batch that fits: 4" in done.stdout, done.stdout
    r = json.loads(out.read_text())
    assert [x["batch_size"] for x in r] == [4, 8, 16, 400000]  # ascending; stops after the first that fails
    assert [x["fits"] for x in r] == [True, True, True, False]
    assert r[0]["implementations"]["loss"].startswith("chunked")
