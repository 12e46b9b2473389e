"""One command that proves a machine with an accelerator: what it runs, that it computes right, how fast.

    python -m nanogpt_jax.device_check --out=device_check                  # a GPU or TPU: sized for ~5 min
    python -m nanogpt_jax.device_check --out=dc --nanogpt=/tmp/nanoGPT     # + nanoGPT's bench.py beside ours
    python -m nanogpt_jax.device_check --out=dc --quick                    # tiny shapes: under a minute
    python -m nanogpt_jax.device_check --out=dc --batch_sizes=4,8          # other train rows (per device)

It writes OUT/device_check.json (every figure) and OUT/device_check.md (the same as tables, to paste
into an issue), rewritten after each section so that a run cut short keeps what it measured; prints
the markdown; and exits with status 1 when a correctness check failed (0 otherwise: a speed section
that could not run is reported, not fatal). Every section runs on its own: one that raises is
recorded as failed with its one-line reason, and the others still run.

- env: versions (python, jax, jaxlib, flax, optax, orbax-checkpoint, jax's accelerator plugins,
  cuDNN, torch) and devices (platform, kind, count, processes, the memory JAX may use per device).
- gpu_target_config (GPUs): XLA's description of this GPU (`GpuTargetConfigProto` in text form)
  written to OUT/gpu_target_config.txtpb, for compiling without it:
  `python -m nanogpt_jax.aot --topology=gpu-1 --gpu_target_config=OUT/gpu_target_config.txtpb`.
- checks, each pass/fail with its error and tolerance (`TOLERANCE`; errors are norm-wise relative,
  ||got - want|| / ||want|| over the output, and over every gradient together):
  attention: the kernel model.attention="auto" picks here (`model.attention_impl`: cudnn on a GPU in
  bfloat16, splash on a TPU, xla on a CPU, where the check compares xla with itself) against the XLA
  attention, one GPT-2 attention layer's output and its gradients with respect to the input and the
  weights, in bfloat16 and float32. chunked_loss: model.loss="chunked" with a small loss_chunk (the
  last chunk padded) against model.loss="full", the mean loss and every parameter's gradient, in
  float32 and, on an accelerator, bfloat16.
  generation: greedy tokens of `generate` (KV cache) against `bench.generate.recompute_greedy` (a
  full forward per token), float32: identical or failed. The float32 checks run at
  jax_default_matmul_precision=float32: a GPU's default TF32 or a TPU's single bfloat16 pass would
  make rounding, not the algorithm, the difference.
- generate: `bench.generate.bench_case`, greedy with the KV cache, GPT-2 124M shape, batch 1 and 8:
  new tokens/s per row (prefill included) and over all rows.
- train (run last): `bench.train.train_row` (the real jitted step, random ids) for GPT-2 124M, block
  1024, bfloat16 at a few per-device batch sizes, ascending: ms/step, tokens/s, MFU (`metrics.mfu`),
  the device's peak bytes in use (the process's peak so far: rows ascend after everything else, so
  it is the row's) against the compiled step's memory_analysis(), and on a GPU the deviceless AOT
  figure of the largest batch (`aot.compile_train_step` for this GPU's dumped description).
- side_by_side (--nanogpt=DIR, a karpathy/nanoGPT checkout): scripts/nanogpt_side_by_side.py's step
  comparison, nanoGPT's bench.py (torch.compile on a GPU) against run_bench.py, tokens/s and MFU of
  both (a few minutes more). It runs first, before this process starts JAX's backend, so that each
  side's process has the accelerator's whole memory.

Quick mode (--quick, and always on a machine without an accelerator): a 2-layer, width-64 model,
block 64-128, a few steps, the whole command well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import cli, metrics, storage
from nanogpt_jax import generate as gen
from nanogpt_jax.bench import report
from nanogpt_jax.errors import UserError, fail
from nanogpt_jax.model import GPT, CausalSelfAttention, GPTConfig, attention_impl, init_params

SCHEMA = "nanogpt_jax-device-check/1"
ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/ and scripts/ are not installed with the package
SIDE_BY_SIDE = ROOT / "scripts" / "nanogpt_side_by_side.py"
# norm-wise relative error allowed per compute dtype: bfloat16 keeps 8 bits of mantissa (2^-8 = 0.4%
# per rounding; a layer's outputs and gradients gather several), float32 24 bits
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-5}
# distributions whose versions decide the figures, besides jax, jaxlib, flax and optax (in report.environment)
PACKAGES = ("orbax-checkpoint", "numpy", "torch")
PLUGINS = re.compile(r"^(jax[-_]cuda\d*[-_](plugin|pjrt)|jax[-_]rocm\d*[-_](plugin|pjrt)|libtpu.*|"
                     r"nvidia[-_]cudnn.*|nvidia[-_]cublas.*)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What each section runs at. Layers are (batch, tokens, heads, width); models GPTConfig fields."""

    layer: tuple[int, int, int, int]  # attention check: one attention layer
    model: dict[str, int]  # loss and generation checks
    batch: int  # loss check rows
    loss_chunk: int  # a chunk that does not divide block_size: the last chunk is padded
    check_tokens: tuple[int, int]  # generation check: prompt, new tokens
    train_model: dict[str, int]  # config.model overrides of the train rows (GPT-2 124M when empty)
    batch_sizes: tuple[int, ...]  # train rows: sequences per device, ascending
    steps: int  # timed train steps per row (bench.steps)
    warmup: int  # untimed steps after the first (bench.warmup)
    gen_model: dict[str, int]  # generation speed: GPTConfig fields (GPT-2 124M when empty)
    gen_tokens: tuple[int, int]  # generation speed: prompt, new tokens
    gen_batches: tuple[int, ...]
    repeats: int  # timed generate calls per case (the best counts)
    side_by_side: tuple[int, int]  # nanoGPT step comparison: batch, block


_GPT2 = {"block_size": 1024, "vocab_size": 50304}  # nanoGPT's padded vocabulary: what it trains with
_TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "block_size": 64}
FULL = Shapes(
    layer=(4, 1024, 12, 768), model={"n_layer": 2, "n_head": 12, "n_embd": 768, **_GPT2}, batch=4, loss_chunk=384,
    check_tokens=(16, 32), train_model={}, batch_sizes=(8, 16, 32), steps=10, warmup=2, gen_model={},
    gen_tokens=(32, 128), gen_batches=(1, 8), repeats=3, side_by_side=(16, 1024))
QUICK = Shapes(  # one model shape for the checks, the train rows and generation: one init
    layer=(2, 128, 2, 64), model=_TINY, batch=2, loss_chunk=24, check_tokens=(8, 16), train_model=_TINY,
    batch_sizes=(1, 2), steps=3, warmup=1, gen_model=_TINY, gen_tokens=(8, 16), gen_batches=(1, 8), repeats=2,
    side_by_side=(1, 64))


# ---- running sections -------------------------------------------------------------------------


class Skip(Exception):
    """Raised by a section that does not apply on this machine: reported as skipped, with the reason."""


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return " ".join(f"{type(e).__name__}: {first}".split())[:300]


def run_section(name: str, fn: Callable[..., dict], *args: Any) -> dict:
    """`{"status": "ok", **fn(*args)}`; `{"status": "skipped", "reason": ...}` when fn raises Skip;
    `{"status": "failed", "reason": <one line>}` when it raises anything else (a section that cannot
    run is a finding of the check, not its end). "seconds" in each case."""
    logging.info("device check: %s", name)
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn(*args)}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded in the report; the other sections still run
        logging.warning("device check: %s failed: %s", name, one_line(e))
        out = {"status": "failed", "reason": one_line(e)}
    return {**out, "seconds": time.perf_counter() - t0}


# ---- environment ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """`bench.report.environment()` (jax, jaxlib, flax, optax, devices, CPU, load), plus the platform,
    local devices, what JAX may allocate per device (`memory_stats()["bytes_limit"]`, None on a CPU),
    and the versions of PACKAGES and of the installed accelerator plugins (None: not installed)."""
    device = jax.devices()[0]
    plugins = {d.metadata["Name"]: d.version for d in metadata.distributions()
               if d.metadata["Name"] and PLUGINS.match(d.metadata["Name"])}
    return {**report.environment(), "platform": device.platform, "local_device_count": jax.local_device_count(),
            "bytes_limit": (device.memory_stats() or {}).get("bytes_limit"),
            "packages": {name: report.package_version(name) for name in PACKAGES}, "plugins": dict(sorted(
                plugins.items()))}


def save_gpu_target_config(out_dir: Path) -> dict[str, Any]:
    """Write this GPU's XLA target description (text `GpuTargetConfigProto`: gpu_device_info {...},
    platform_name, dnn_version_info, device_description_str) to out_dir/gpu_target_config.txtpb.

    Raises:
        Skip: not a GPU.
        ValueError: JAX's topology of the GPU holds no description in text form.
    """
    device = jax.devices()[0]
    if device.platform != "gpu":
        raise Skip(f"not a GPU ({device.platform}): XLA target descriptions are for GPUs")
    # private: jax 0.10 has no public API for it; jax's own tests (aot_test.py) read it this way
    from jax._src.lib import xla_client

    text = xla_client.get_topology_for_devices(jax.devices()).target_config
    text = text.decode() if isinstance(text, bytes) else str(text)
    if "gpu_device_info" not in text:
        raise ValueError("the GPU topology's target_config is not a GpuTargetConfigProto in text form")
    path = out_dir / "gpu_target_config.txtpb"
    header = (f"# XLA GPU target description of this machine's {device.device_kind}, written by python -m "
              f"nanogpt_jax.device_check (jax {jax.__version__}, {_now()}).\n# Compile for it anywhere: python -m "
              "nanogpt_jax.aot --config ... --topology=gpu-1 --gpu_target_config=THIS_FILE\n")
    path.write_text(header + text.rstrip() + "\n")
    return {"path": str(path), "device_kind": device.device_kind}


# ---- correctness checks -----------------------------------------------------------------------


def compare(got: Any, want: Any) -> dict[str, float]:
    """Max abs error and norm-wise relative error ||got - want|| / ||want|| over every leaf of two
    pytrees of arrays (any float dtype), computed in float64 on the host."""
    def flat(tree: Any) -> np.ndarray:
        return np.concatenate([np.asarray(x).astype(np.float64).ravel() for x in jax.tree.leaves(tree)])

    a, b = flat(got), flat(want)
    diff = a - b
    return {"max_abs_error": float(np.abs(diff).max()),
            "rel_error": float(np.linalg.norm(diff) / max(float(np.linalg.norm(b)), 1e-30))}


def _verdict(parts: dict[str, dict[str, float]], dtype: str) -> dict[str, Any]:
    """A check's result from the comparisons of its parts: the worst part's errors against TOLERANCE[dtype]."""
    worst = max(parts.values(), key=lambda p: p["rel_error"])
    tol = TOLERANCE[dtype]
    return {"passed": bool(worst["rel_error"] <= tol), "max_abs_error": max(p["max_abs_error"] for p in parts.values()),
            "rel_error": worst["rel_error"], "tolerance": tol, "parts": parts}


def _precision(dtype: str):
    """float32 checks compare algorithms, so their matmuls run in true float32 (see the module docstring)."""
    return jax.default_matmul_precision("float32" if dtype == "float32" else None)


@functools.partial(jax.jit, static_argnums=0)
def _attention_layer_grads(config: GPTConfig, params: dict, x_BTD: jax.Array, w_BTD: jax.Array) -> tuple:
    """One attention layer's output (B, T, D) in config.dtype, and the gradients of sum(output x w)
    with respect to its float32 parameters and its input (B, T, D)."""
    def loss(params, x_BTD):
        y_BTD, _ = CausalSelfAttention(config).apply({"params": params}, x_BTD, None, 0, True)
        return (y_BTD.astype(jnp.float32) * w_BTD).sum(), y_BTD

    (_, y_BTD), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x_BTD)
    return y_BTD, grads


def check_attention(shapes: Shapes, dtype: str) -> dict[str, Any]:
    """The attention model.attention="auto" picks here against "xla" on one attention layer (c_attn,
    attention, c_proj) of `shapes.layer`: its output and the gradients of a weighted sum of it with
    respect to the input and the weights. Inputs are N(0, 1) and weights N(0, 0.1^2), five times
    GPT-2's init, so that attention is peaked, as trained, rather than the near-uniform average of a
    fresh init (drawn by numpy: nothing to compile). Where auto picks xla, both sides are one
    compiled program (the comparison is exact by construction, and says so)."""
    B, T, H, D = shapes.layer
    platform = jax.devices()[0].platform
    reference = GPTConfig(block_size=T, n_head=H, n_embd=D, n_layer=1, dtype=dtype, attention="xla")
    impl = attention_impl(dataclasses.replace(reference, attention="auto"), platform, seq_len=T, train=False).impl
    rng = np.random.default_rng(0)
    x_BTD, w_BTD = (rng.standard_normal((B, T, D), np.float32) for _ in range(2))
    init = lambda key: CausalSelfAttention(reference).init(key, x_BTD, None, 0, True)  # noqa: E731
    shapes_only = jax.eval_shape(init, jax.random.key(0))
    params = jax.tree.map(lambda p: 0.1 * rng.standard_normal(p.shape, np.float32), nn.unbox(shapes_only["params"]))
    with _precision(dtype):
        y, g = _attention_layer_grads(dataclasses.replace(reference, attention=impl), params, x_BTD, w_BTD)
        y_ref, g_ref = _attention_layer_grads(reference, params, x_BTD, w_BTD)
    note = f"auto is xla on {platform} in {dtype}: the same implementation" if impl == "xla" else ""
    return {"compared": f"{impl} vs xla: one layer B{B} T{T} H{H} D{D}, output and gradients", "impl": impl,
            "note": note, **_verdict({"output": compare(y, y_ref), "gradients": compare(g, g_ref)}, dtype)}


@functools.cache
def fresh_params(config: GPTConfig) -> dict:
    """Float32 parameters of a fresh init (key 0) of `config`'s shape, made once per shape: the dtype,
    attention and loss leave them unchanged, and a jitted init takes seconds to compile on a CPU."""
    shape = GPTConfig(**{f: getattr(config, f) for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                          "bias")})
    if shape != config:
        return fresh_params(shape)
    return jax.jit(functools.partial(init_params, GPT(config)))(jax.random.key(0))


def _check_model(shapes: Shapes, dtype: str, **overrides: Any) -> tuple[GPTConfig, dict]:
    """The checks' model (attention "auto": what training runs here) and its fresh float32 parameters."""
    config = GPTConfig(**shapes.model, dtype=dtype, attention="auto", **overrides)
    return config, fresh_params(config)


def check_chunked_loss(shapes: Shapes, dtype: str) -> dict[str, Any]:
    """GPT.losses with loss="chunked" (loss_chunk=shapes.loss_chunk) against loss="full": the mean loss
    and the gradient of every parameter, on random tokens."""
    config, params = _check_model(shapes, dtype, loss="chunked", loss_chunk=shapes.loss_chunk)
    B, T, V = shapes.batch, config.block_size, config.vocab_size
    x_BT, y_BT = (jax.random.randint(jax.random.key(i), (B, T), 0, V, jnp.int32) for i in (1, 2))

    def loss_and_grads(c: GPTConfig) -> tuple:
        loss = lambda p: GPT(c).apply({"params": p}, x_BT, y_BT, method=GPT.losses).mean()  # noqa: E731
        with _precision(dtype):
            return jax.jit(jax.value_and_grad(loss))(params)

    (loss, g), (loss_ref, g_ref) = loss_and_grads(config), loss_and_grads(dataclasses.replace(config, loss="full"))
    chunks = -(-T // shapes.loss_chunk)
    return {"compared": f"chunked ({chunks} x {shapes.loss_chunk} positions, last padded) vs full: B{B} T{T} "
                        f"V{V}, loss and gradients", "impl": "chunked", "note": f"loss {float(loss_ref):.4f}",
            **_verdict({"loss": compare(loss, loss_ref), "gradients": compare(g, g_ref)}, dtype)}


def check_generation(shapes: Shapes, dtype: str = "float32") -> dict[str, Any]:
    """Greedy tokens of `generate` (prefill + KV-cache decode loop) against `recompute_greedy` (a full
    forward over the buffer per new token): identical, or failed with the number that differ. The tied
    embedding is scaled up (x8) so that the logits are peaked, as a trained model's, not near-ties."""
    from nanogpt_jax.bench.generate import recompute_greedy

    config, params = _check_model(shapes, dtype)
    params = dict(params, wte={"embedding": 8 * params["wte"]["embedding"]})
    (prompt, new), model = shapes.check_tokens, GPT(config)
    idx_BT = jax.random.randint(jax.random.key(3), (2, prompt), 0, config.vocab_size, jnp.int32)
    with _precision(dtype):  # vocab_limit: argmax over every id, as recompute_greedy takes it
        cached = np.asarray(gen.generate(model, params, idx_BT, new, temperature=0.0, vocab_limit=config.vocab_size))
        recomputed = np.asarray(recompute_greedy(model, params, idx_BT, new))
    differ = int((cached != recomputed).sum())
    return {"compared": f"KV cache vs recompute: greedy, 2 rows, {prompt}-token prompt + {new} new", "impl": "kv_cache",
            "passed": differ == 0, "max_abs_error": None, "rel_error": None, "tolerance": 0,
            "note": "identical tokens" if differ == 0 else f"{differ} of {2 * new} new tokens differ"}


def planned_checks(platform: str) -> list[tuple[str, str, Callable[[Shapes, str], dict]]]:
    """(name, dtype, check) of each check on `platform`: the attention in bfloat16 and float32, the
    chunked loss in float32 and, on accelerators, in bfloat16 (what training computes in there; a
    CPU trains in float32), generation in float32."""
    loss_dtypes = ("float32",) if platform == "cpu" else ("bfloat16", "float32")
    return [("attention", "bfloat16", check_attention), ("attention", "float32", check_attention),
            *(("chunked_loss", dtype, check_chunked_loss) for dtype in loss_dtypes),
            ("generation", "float32", check_generation)]


def run_checks(shapes: Shapes) -> list[dict[str, Any]]:
    """Every check of `planned_checks`, each on its own: one that raises is failed with its one-line error."""
    results = []
    for name, dtype, fn in planned_checks(jax.devices()[0].platform):
        row = run_section(f"check {name} {dtype}", fn, shapes, dtype)
        if row["status"] == "failed":
            row.update(passed=False, error=row.pop("reason"))
        results.append({"name": name, "dtype": dtype, **row})
        logging.info("check %s %s: %s", name, dtype, "pass" if row["passed"] else "FAIL")
    return results


# ---- speed ------------------------------------------------------------------------------------


def _load_default_config() -> ConfigDict:
    """configs/default.py (every key; GPT-2 124M, nanoGPT's recipe) from the checkout."""
    path = ROOT / "configs" / "default.py"
    if not path.is_file():
        raise UserError(f"{path} not found: run the device check from a checkout of the repository (configs/ is "
                        "not installed with the package)")
    spec = importlib.util.spec_from_file_location("nanogpt_jax_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_config(shapes: Shapes, per_device: int) -> ConfigDict:
    """The bench config of one train row: configs/default.py's GPT-2 124M (or the quick model), vocab
    50304, bfloat16 on accelerators (model.dtype auto), no accumulation, `per_device` sequences on each
    device of a data-parallel mesh over all of them, random ids."""
    from nanogpt_jax.config import validate

    c = _load_default_config()
    c.model.update({"vocab_size": 50304, **shapes.train_model})
    c.train.gradient_accumulation_steps = 1
    c.train.batch_size = per_device * jax.device_count()
    c.bench.steps, c.bench.warmup = shapes.steps, shapes.warmup
    validate(c)
    return c


def _compiled_bytes(memory: dict[str, int | None]) -> int | None:
    """Arguments + outputs not aliased to them + temporaries + code (`report.memory_figures`' keys):
    the device memory the compiled step occupies, as `aot.Report.compiled_bytes` counts it."""
    keys = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes")
    if any(memory.get(k) is None for k in keys):
        return None
    return memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"] + \
        memory["generated_code_bytes"]


def train_rows(shapes: Shapes, batch_sizes: Sequence[int], target_config: str | None) -> dict[str, Any]:
    """One `bench.train.train_row` per per-device batch size (ascending; one that fails, e.g. out of
    memory, is recorded with its reason), then on a GPU the deviceless AOT compile of the largest that ran."""
    rows = []
    for b in sorted(batch_sizes):
        row = run_section(f"train step, {b} sequences per device", _train_row, shapes, b)
        if row["status"] == "ok":
            row["results"]["compiled_bytes"] = _compiled_bytes(row["results"]["memory"])
        rows.append({"batch_per_device": b, **row})
    ran = [r for r in rows if r["status"] == "ok"]
    aot = {"status": "skipped", "reason": "no train row ran"}
    if jax.devices()[0].platform != "gpu":
        aot = {"status": "skipped", "reason": f"deviceless GPU compile: not a GPU ({jax.devices()[0].platform})"}
    elif ran:
        aot = run_section("AOT compile", aot_figure, shapes, ran[-1]["batch_per_device"], target_config)
        ran[-1]["aot"] = aot
    return {"rows": rows, "aot": aot}


def _train_row(shapes: Shapes, per_device: int) -> dict[str, Any]:
    """`bench.train.train_row` of `train_config` (its global batch: per_device x the devices)."""
    from nanogpt_jax.bench.train import train_row

    return train_row(train_config(shapes, per_device), per_device * jax.device_count())


def _gpu_kind(device_kind: str) -> str:
    """The AOT tool's GPU kind (h100, h200, a100, a100-40g) of a device_kind such as "NVIDIA H100 80GB HBM3"."""
    name = device_kind.lower()
    kinds = ((r"\bh200\b", "h200"), (r"\bh[18]00\b|\bgh200\b", "h100"), (r"\ba100\b.*\b40\s*gb", "a100-40g"),
             (r"\ba100\b", "a100"))
    for pattern, kind in kinds:
        if re.search(pattern, name):
            return kind
    raise ValueError(f"no shipped target description for {device_kind!r}, and none was dumped from it")


def aot_figure(shapes: Shapes, per_device: int, target_config: str | None) -> dict[str, Any]:
    """The deviceless compile of the same train step (`aot.compile_train_step`) for this many GPUs of
    this GPU's dumped description (topology gpu-N), else of its kind's shipped one (h100-N, ...)."""
    from nanogpt_jax import aot

    n = jax.device_count()
    topology = f"gpu-{n}" if target_config else f"{_gpu_kind(jax.devices()[0].device_kind)}-{n}"
    r = aot.compile_train_step(train_config(shapes, per_device), topology, gpu_target_config=target_config)
    return {"topology": topology, "gpu_target_config": target_config, "batch_per_device": per_device,
            "compiled_bytes": r.compiled_bytes, "compile_s": r.compile_seconds, "error": r.error}


def generate_rows(shapes: Shapes) -> dict[str, Any]:
    """`bench.generate.bench_case` (greedy, KV cache) per batch of shapes.gen_batches, GPT-2 124M shape
    (or the quick model), random weights, bfloat16 on accelerators and float32 on a CPU."""
    from nanogpt_jax.bench.generate import bench_case
    from nanogpt_jax.config import resolve_dtype

    config = GPTConfig.gpt2("gpt2", **{**_GPT2, **shapes.gen_model, "dtype": resolve_dtype("auto")})
    params = fresh_params(config)
    prompt, new = shapes.gen_tokens
    rows = []
    for b in shapes.gen_batches:
        r = bench_case(config, params, b, "generate", prompt, new, shapes.repeats)
        rows.append({"model": f"{config.n_layer}x{config.n_head}x{config.n_embd}", "batch_size": b,
                     "dtype": config.dtype, "prompt_len": prompt, "new_tokens": new, "compile_s": r["compile_s"],
                     "tokens_per_s": r["tokens_per_s"], "tokens_per_s_all_rows": r["total_tokens_per_s"]})
    return {"rows": rows}


# ---- side by side with nanoGPT ------------------------------------------------------------------


def check_nanogpt(checkout: str | None) -> Path | None:
    """The --nanogpt folder, resolved; UserError (before anything runs) unless it is a nanoGPT checkout."""
    if checkout is None:
        return None
    path = Path(checkout).expanduser().resolve()
    missing = [f for f in ("bench.py", "model.py", "train.py") if not (path / f).is_file()]
    if missing:
        raise UserError(f"--nanogpt={checkout!r} is not a karpathy/nanoGPT checkout (no {', '.join(missing)}); "
                        "git clone https://github.com/karpathy/nanoGPT and pass its folder")
    if not SIDE_BY_SIDE.is_file():
        raise UserError(f"--nanogpt needs {SIDE_BY_SIDE} (run from a checkout of the repository)")
    return path


def probe_platform() -> str:
    """The default backend's platform, asked of a child process so that this one has not started its
    backend yet (a started GPU backend holds most of the GPU's memory)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                         capture_output=True, text=True, check=False)
    if out.returncode or not out.stdout.strip():
        return jax.devices()[0].platform  # JAX's own error, if it cannot start here either
    return out.stdout.strip().splitlines()[-1]


def side_by_side(checkout: Path, shapes: Shapes, platform: str) -> dict[str, Any]:
    """scripts/nanogpt_side_by_side.py --what step (one round): nanoGPT's bench.py (torch.compile and
    bfloat16 on a GPU, float32 eager on a CPU) against run_bench.py, GPT-2 124M at shapes.side_by_side;
    tokens/s of both and MFU from the same formula and peak."""
    if platform == "tpu":
        raise Skip("nanoGPT's bench.py runs on CUDA or a CPU, not on TPUs")
    gpu = platform == "gpu"
    batch, block = shapes.side_by_side
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, str(SIDE_BY_SIDE), str(checkout), "--what", "step", "--rounds", "1", "--step-batch",
               str(batch), "--step-block", str(block), "--device", "cuda" if gpu else "cpu", "--dtype",
               "bfloat16" if gpu else "float32", "--json", str(out), *(["--compile"] if gpu else [])]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode:
            tail = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
            raise RuntimeError(f"{SIDE_BY_SIDE.name} failed ({r.returncode}): {tail[-1] if tail else ''}")
        step = json.loads(out.read_text())["step"]
    theirs, ours = step["nanogpt"][0], step["ours"][0]
    # nanoGPT's bench.py runs on one device; ours' MFU is run_bench.py's own (over the devices it used)
    mfu = metrics.mfu(ours["flops_per_token"], theirs["tokens_per_s"], 1, ours["peak_flops_per_device"])
    return {"shape": f"gpt2 124M, batch {batch}, block {block}", "dtype": "bfloat16" if gpu else "float32",
            "nanogpt_compile": gpu, "peak_source": ours["peak_source"], "command": " ".join(cmd[1:]),
            "nanogpt": {"ms_per_step": theirs["ms_per_step"], "tokens_per_s": theirs["tokens_per_s"], "mfu": mfu},
            "ours": {k: ours[k] for k in ("ms_per_step", "tokens_per_s", "mfu")}}


# ---- the report -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sci(v: float) -> str:
    return f"{v:.2e}"


def _env_lines(r: dict) -> list[str]:
    env = r["env"]
    if env["status"] != "ok":
        return [f"{env['status']}: {env['reason']}"]
    limit = f"{env['bytes_limit'] / 2**30:.1f} GiB usable per device (bytes_limit)" if env.get("bytes_limit") else \
        "not reported (CPU)"
    extra = {**env["packages"], **env["plugins"]}
    target = r["gpu_target_config"]
    target_cell = f"`{target['path']}` (`--gpu_target_config=` of `python -m nanogpt_jax.aot`)" if \
        target["status"] == "ok" else f"{target['status']}: {target['reason']}"
    rows = [("devices", f"{env['device_count']} x {env['device_kind']} ({env['platform']}), "
                        f"{env['process_count']} process(es)"), ("device memory", limit),
            ("python / jax / jaxlib", f"{env['python']} / {env['jax']} / {env['jaxlib']}"),
            ("flax / optax", f"{env['flax']} / {env['optax']}"),
            ("other packages", ", ".join(f"{k} {v}" for k, v in extra.items() if v) or "-"),
            ("host", f"{env['cpu']} ({env['cpu_count']} CPUs)" + (
                f", load average {env['load_avg_1m']:.1f}" if env.get("load_avg_1m") is not None else "")),
            ("XLA target description", target_cell)]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


CHECK_COLUMNS: list[report.Column] = [
    ("check", "name", str), ("dtype", "dtype", str), ("compared", "compared", str),
    ("max abs error", "max_abs_error", _sci), ("relative error", "rel_error", _sci),
    ("tolerance", "tolerance", lambda v: "exact" if v == 0 else f"{v:g}"),
    ("result", "result", str), ("note", "note", str)]
TRAIN_COLUMNS: list[report.Column] = [
    ("batch/device", "batch_per_device", str), ("attention", "attention", str), ("loss", "loss", str),
    ("compile s", "compile_s", report.num(1)), ("ms/step", "ms_per_step", report.num(1)),
    ("tokens/s", "tokens_per_s", report.num(0)), ("MFU", "mfu_cell", str),
    ("device peak MiB", "device_peak_bytes", report.mib), ("compiled MiB", "compiled_bytes", report.mib),
    ("AOT MiB", "aot_bytes", report.mib), ("error", "error", str)]
GENERATE_COLUMNS: list[report.Column] = [
    ("model", "model", str), ("batch", "batch_size", str), ("dtype", "dtype", str), ("prompt", "prompt_len", str),
    ("new", "new_tokens", str), ("compile s", "compile_s", report.num(1)),
    ("tokens/s per row", "tokens_per_s", report.num(1)), ("tokens/s all rows", "tokens_per_s_all_rows", report.num(1))]


def _check_cells(c: dict) -> dict:
    return {**c, "result": "pass" if c["passed"] else "**FAIL**", "note": c.get("error") or c.get("note") or None}


def _train_cells(row: dict) -> dict:
    if row["status"] != "ok":
        return {"batch_per_device": row["batch_per_device"], "error": row["reason"]}
    r = row["results"]
    aot = row.get("aot") or {}
    mfu = "unknown" if r["mfu"] is None else metrics.format_mfu(r["mfu"])  # no peak for this chip
    return {"batch_per_device": row["batch_per_device"], **row["settings"], **r, **r["memory"], "mfu_cell": mfu,
            "aot_bytes": aot.get("compiled_bytes")}


def _section_lines(title: str, section: dict, table: Callable[[dict], list[str]]) -> list[str]:
    if section["status"] != "ok":
        return [f"## {title}", "", f"{section['status']}: {section['reason']}", ""]
    return [f"## {title}", "", *table(section), ""]


def _train_table(section: dict) -> list[str]:
    rows = section["rows"]
    first = next((r for r in rows if r["status"] == "ok"), None)
    head = []
    if first:
        s, res = first["settings"], first["results"]
        head = [f"{s['model']} ({metrics.format_params(s['params'])} parameters), {s['dtype']}, "
                f"block {s['block_size']}, "
                f"{s['mesh']['data']} device(s) data-parallel, {s['vocab_size']} vocabulary, random ids. MFU: "
                f"{res['flops_formula']}; peak: {res['peak_source']}. Device peak: the process's peak bytes in use "
                "after the row (rows run ascending, last); compiled: memory_analysis() arguments + outputs not "
                "aliased + temporaries + code; AOT: the same step compiled without the device.", ""]
    aot = section["aot"]
    if aot["status"] != "ok":
        tail = ["", f"AOT: {aot['status']}: {aot['reason']}"]
    else:
        tail = ["", f"AOT: the step compiled for `{aot['topology']}` without the device ({aot['compile_s']:.1f} s)"
                + (f"; XLA: {aot['error']}" if aot["error"] else "")]
    return head + report.markdown_table(TRAIN_COLUMNS, [_train_cells(r) for r in rows]) + tail


def _side_table(section: dict) -> list[str]:
    a, b = section["nanogpt"], section["ours"]
    pct = lambda v: "unknown" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    torch_side = "nanoGPT (torch.compile)" if section["nanogpt_compile"] else "nanoGPT (eager)"
    return [f"{section['shape']}, {section['dtype']}; MFU peak: {section['peak_source']}", "",
            f"| figure | {torch_side} | nanogpt_jax | ours / theirs |", "|---|---|---|---|",
            f"| tokens/s | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
            f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x |",
            f"| ms/step | {a['ms_per_step']:,.1f} | {b['ms_per_step']:,.1f} | |",
            f"| MFU | {pct(a['mfu'])} | {pct(b['mfu'])} | |"]


def markdown(r: dict) -> str:
    """The report as markdown: environment, checks, train step, generation and side-by-side tables."""
    env = r["env"]
    where = f"{env.get('device_count', '?')} x {env.get('device_kind', '?')}"
    checks = r["checks"]
    n_failed = sum(not c["passed"] for c in checks)
    verdict = f"all {len(checks)} passed" if not n_failed else f"{n_failed} of {len(checks)} FAILED"
    lines = [f"# Device check: {where}, {r['mode']} mode", "",
             f"{r['time']}; {r['quick_reason'] or 'full shapes'}; {r.get('seconds', 0):.0f} s", "",
             "## Environment", "", *_env_lines(r), "", f"## Correctness: {verdict}", "",
             *report.markdown_table(CHECK_COLUMNS, [_check_cells(c) for c in checks]), "",
             "Relative error: ||got - want|| / ||want|| over the output, and over all gradients together; "
             "float32 checks at jax_default_matmul_precision=float32.", ""]
    lines += _section_lines("Train step", r["train"], _train_table)
    lines += _section_lines("Generation (greedy, KV cache; prefill included)", r["generate"],
                            lambda s: report.markdown_table(GENERATE_COLUMNS, s["rows"]))
    lines += _section_lines("Side by side with nanoGPT", r["side_by_side"], _side_table)
    return "\n".join(lines).rstrip() + "\n"


def write(r: dict, out_dir: Path) -> list[Path]:
    """OUT/device_check.json and OUT/device_check.md from the report so far (each replaced whole)."""
    paths = [out_dir / "device_check.json", out_dir / "device_check.md"]
    storage.write_atomic(paths[0], json.dumps(report.jsonable(r), indent=1) + "\n")
    storage.write_atomic(paths[1], markdown(r))
    return paths


# ---- the command ------------------------------------------------------------------------------


def _pending(what: str) -> dict:
    return {"status": "not run", "reason": f"{what} had not run when this was written"}


def run(out_dir: Path, quick: bool = False, nanogpt: Path | None = None,
        batch_sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Run every section (see the module docstring) and write OUT/device_check.{json,md} after each.

    Args:
        out_dir: an existing folder for the report (and gpu_target_config.txtpb on a GPU).
        quick: tiny shapes (QUICK); forced on when the machine has no accelerator.
        nanogpt: a checked nanoGPT checkout (`check_nanogpt`), or None to skip the side by side.
        batch_sizes: train rows' sequences per device; default the mode's (FULL: 8, 16, 32).
    Returns:
        the report: {"schema", "time", "mode", "quick_reason", "seconds", "passed", "env",
        "gpu_target_config", "checks", "train", "generate", "side_by_side"}.
    """
    t0 = time.perf_counter()
    platform = probe_platform() if nanogpt else jax.devices()[0].platform  # the child leaves the backend unstarted
    reason = "--quick" if quick else ("no accelerator: quick mode" if platform == "cpu" else None)
    shapes = QUICK if reason else FULL
    r: dict[str, Any] = {"schema": SCHEMA, "time": _now(), "mode": "quick" if reason else "full",
                         "quick_reason": reason, "passed": None, "env": _pending("environment"),
                         "gpu_target_config": _pending("the target description"), "checks": [],
                         "train": _pending("the train step"), "generate": _pending("generation"),
                         "side_by_side": {"status": "skipped", "reason": "--nanogpt not given"}}

    def train() -> dict:
        fresh_params.cache_clear()  # the earlier sections' weights leave the device: its peak is the steps'
        return train_rows(shapes, batch_sizes or shapes.batch_sizes, _target_path(r))

    # the order they run in: the side by side first, before this process's backend takes the
    # accelerator's memory; generation before the train rows, which measure the device's peak memory
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("env", environment), ("gpu_target_config", lambda: save_gpu_target_config(out_dir)),
        ("checks", lambda: run_checks(shapes)), ("generate", lambda: generate_rows(shapes)), ("train", train)]
    if nanogpt:
        sections.insert(0, ("side_by_side", lambda: side_by_side(nanogpt, shapes, platform)))
    for key, fn in sections:
        r[key] = fn() if key == "checks" else run_section(key, fn)
        r["passed"] = all(c["passed"] for c in r["checks"]) if r["checks"] else None
        r["seconds"] = time.perf_counter() - t0
        write(r, out_dir)
    return r


def _target_path(r: dict) -> str | None:
    t = r["gpu_target_config"]
    return t["path"] if t.get("status") == "ok" else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every entry point of the project
        fail(f"{message} (see --help)")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """--batch_sizes=8,16,32 -> (8, 16, 32); ArgumentTypeError (one line, from the parser) otherwise."""
    sizes = tuple(int(s) for s in text.split(",") if s.strip().isdigit())
    if not sizes or len(sizes) != len(text.split(",")) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give sequences per device as positive integers, e.g. 8,16,32")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nanogpt_jax.device_check`: parse the flags, `run`, print the markdown; returns the exit
    status (1 when a correctness check failed). Bad input (an --out that is a file, a --nanogpt folder
    that is not a nanoGPT checkout) is one line, `error: ...`, exit status 1, before anything runs."""
    p = _Parser(prog="python -m nanogpt_jax.device_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for device_check.json, .md (and gpu_target_config.txtpb)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (always on without an accelerator)")
    p.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout: run its bench.py beside ours")
    p.add_argument("--batch_sizes", type=_batch_sizes, help="train rows: sequences per device, e.g. 8,16,32")
    args = p.parse_args(argv)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(cli._quiet_libraries)  # jax's and orbax's own INFO lines stay out
    logging.set_verbosity(logging.INFO)
    try:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out={args.out!r} is a file; give a folder for the report")
        checkout = check_nanogpt(args.nanogpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        r = run(out_dir, args.quick, checkout, args.batch_sizes)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")
    sys.stdout.write(markdown(r) + f"\nwrote {out_dir / 'device_check.json'}, {out_dir / 'device_check.md'}\n")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
