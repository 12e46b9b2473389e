"""The sections of the device check (`python -m nanogpt_jax.device_check`), each a function that
returns its part of the report as a dict: the environment, this GPU's XLA target description, the
correctness checks, the generation and train-step speed rows, and the side by side with nanoGPT.

    row = run_section("check attention float32", check_attention, QUICK, "float32")
    checks = run_checks(FULL)             # every check of planned_checks(platform), each on its own

`run_section` turns a section that raises into a row, `{"status": "failed", "reason": <one line>}`
(`Skip`: "skipped"), so one section's failure never ends the check. What each section measures, and
its shapes (FULL, QUICK), are described in nanogpt_jax/device_check.py's docstring; the command,
the order the sections run in and the report (JSON and markdown) are there too.
"""

from __future__ import annotations

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import generate as gen
from nanogpt_jax import metrics
from nanogpt_jax.attention import attention_impl
from nanogpt_jax.bench import report
from nanogpt_jax.errors import UserError
from nanogpt_jax.model import GPT, CausalSelfAttention, GPTConfig, init_params

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


def now() -> str:
    """The time now, UTC, to the second, in ISO 8601 (the report's "time" and file headers)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
              f"nanogpt_jax.device_check (jax {jax.__version__}, {now()}).\n# Compile for it anywhere: python -m "
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
    """float32 checks compare algorithms, so their matmuls run in true float32 (see device_check's docstring)."""
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
    impl = attention_impl("auto", reference.dtype, reference.dropout, platform, seq_len=T, train=False).impl
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
