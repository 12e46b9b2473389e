"""How much memory one device needs for a training step, by formula, before compiling anything.

    python -m nanogpt_jax.memory --config configs/owt.py:gpt2-xl --config.mesh.data=1 --config.mesh.fsdp=8 \\
        --config.model.dtype=bfloat16 --devices=8 --hbm_gib=16 --platform=tpu

The model is the one the run would train: the config's shape, its vocabulary as training picks it
(model.vocab_size, else the data folder's meta.json, else GPT-2's when data.data_dir does not exist
yet; the output says which), and model.dtype resolved as training resolves it on this machine's
backend ("auto": float32 on a CPU, so pass --config.model.dtype=bfloat16 to size an accelerator run
from a laptop). With --hbm_gib, a step that does NOT fit exits with status 1, like nanogpt_jax.aot.

Per device, in bytes, with local rows b = batch_size / (data x fsdp), tokens n = b x block_size per
micro-step, a compute dtype of c bytes and tensor-parallel size t:

    params       float32 parameters, each divided as its sharding divides it (fsdp: the model width;
                 tensor: heads, MLP units, vocabulary rows); a dimension an axis does not divide
                 stays whole, as in `sharding.logical_shardings`
    opt_state    AdamW's two float32 moments, sharded like the parameters (optim.name=muon keeps one
                 momentum for the blocks' matrices: then this is an upper bound)
    grads        the float32 gradient accumulator (sharded like the parameters), and one
                 micro-step's gradient beside it when accumulating (XLA fuses the clipping and the
                 AdamW update into the in-place parameter update: no buffers of their own)
    weights      the compute-dtype copies of the weights that the matmuls read, whole along fsdp
                 (ZeRO-3's all-gather; only when c < 4 or fsdp > 1): all layers are kept for the
                 backward pass without rematerialisation, 2 layers with remat="full"
    activations  what the backward pass keeps, per layer and token: 16 vectors of the model width
                 (Korthikanti et al. 2022, arXiv:2205.05198, section 4.1, without dropout masks):
                 4 whole (block input, ln_1 out, residual after attention, ln_2 out) and 12 split
                 over tensor (q, k, v, attention output, the MLP hidden before and after GELU);
                 plus H/t x T attention entries of 8 + c bytes (float32 scores and probabilities,
                 and the probabilities in the compute dtype for the second matmul) with the XLA
                 attention, or H/t float32 log-sum-exps with a fused attention that never writes
                 the scores out (splash on TPUs, cuDNN's on GPUs; `attention.attention_impl` decides
                 which runs). remat="full"
                 keeps only each block's input (D x c per token and layer) plus one layer being
                 recomputed; other remat policies are counted as "none" (an upper bound)
    logits       the float32 logits, n x V/t x 4 (their gradient takes over the buffer); with the
                 chunked loss (model.loss="chunked", the default) only one chunk's, b x chunk x V/t x 4,
                 and its gradient beside it (x 2)
    batch        int32 inputs and targets of the step: A x n x 8

`total` is the sum. XLA frees and reuses buffers, so a compiled program's footprint differs:
tests/test_memory.py checks the formula against `compiled.memory_analysis()` (CPU, float32)
within 15%, and `python -m nanogpt_jax.aot` prints both for TPU slices: for gpt2 and gpt2-xl on
v5e and v4 with scan_layers and the XLA attention the estimate is within -11%..+19% of XLA's figure;
with splash attention and the chunked loss (the TPU default) it is about 19% below it (gpt2, 24 to 40
sequences per v5e chip), which can call a tight shape "fits": check those with the aot tool.
Not modelled: what XLA keeps beyond this without scan_layers (gpt2-xl, remat=full: 28% more), XLA's
CPU backend fusing less (up to ~20% more for tiny models, more with scan_layers), tensor
parallelism's activation all-gathers, and TPU layout padding of dimensions that are not multiples
of 128. A TPU keeps small temporaries (tens of MiB)
in on-chip memory, so there the compiled HBM figure can be below the estimate for tiny models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags, logging
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, sharding
from nanogpt_jax.attention import attention_impl
from nanogpt_jax.errors import ConfigError, OutOfMemoryError, UserError
from nanogpt_jax.loss import loss_chunk_len
from nanogpt_jax.model import GPT, GPT2_SIZES, GPT2_VOCAB_SIZE, GPTConfig

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step's buffers; see the module docstring for each term."""

    params: int
    opt_state: int
    grads: int
    weights: int
    activations: int
    logits: int
    batch: int

    @property
    def state(self) -> int:
        """What the step takes as arguments (and donates): parameters, optimizer state, the batch."""
        return self.params + self.opt_state + self.batch

    @property
    def temporaries(self) -> int:
        """What exists only while the step runs."""
        return self.grads + self.weights + self.activations + self.logits

    @property
    def total(self) -> int:
        return self.state + self.temporaries

    def rows(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]


def _elements(shape: tuple[int, ...], spec: tuple, mesh_shape: Mapping[str, int]) -> int:
    """Elements of one device's shard: each dimension divided by its mesh axes where they divide it."""
    n = 1
    for dim, axes in zip(shape, spec, strict=True):
        axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh_shape[a] for a in axes)
        n *= dim // size if dim % size == 0 else dim
    return n


def param_counts(config: GPTConfig, mesh_shape: Mapping[str, int]) -> tuple[int, int, int]:
    """(parameters per device, per device if fsdp did not split them, of which in the blocks).

    From the model's logical axis names and `sharding.RULES` on a mesh given only by its shape, so
    no device is needed. Raises KeyError for a mesh_shape without data, fsdp or tensor."""
    model = GPT(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.RULES)
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    whole_fsdp = {**mesh_shape, "fsdp": 1}
    sharded = gathered = blocks = 0
    for (path, leaf), spec in zip(leaves, flat_specs, strict=True):
        spec = tuple(spec or ()) + (None,) * (leaf.ndim - len(spec or ()))
        sharded += _elements(leaf.shape, spec, mesh_shape)
        n = _elements(leaf.shape, spec, whole_fsdp)
        gathered += n
        if str(getattr(path[0], "key", "")).startswith("h"):  # h_0, h_1, ... or the scanned h
            blocks += n
    return sharded, gathered, blocks


def estimate(config: GPTConfig, *, batch_size: int, grad_accum: int, mesh_shape: Mapping[str, int],
             platform: str | None = None) -> MemoryEstimate:
    """Per-device bytes of one training step of `config`; the terms are in the module docstring.

    Args:
        config: the model. Its dtype is the compute dtype (resolve "auto" first); remat is read.
        batch_size: global sequences per micro-step. grad_accum: micro-steps per optimizer step.
        mesh_shape: {"data": d, "fsdp": f, "tensor": t}, every size known (see `mesh_shape_for`).
        platform: "cpu", "gpu" or "tpu", for the attention that runs there (default: this machine's).
    Raises:
        ConfigError: batch_size is not divisible by data x fsdp.
    """
    d, f, t = (mesh_shape[a] for a in sharding.MESH_AXES)
    sharding.check_batch_size(batch_size, d * f)
    c = jnp.dtype(config.compute_dtype).itemsize
    L, D, H, T, V = config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size
    tokens = batch_size // (d * f) * T
    n_sharded, n_gathered, n_blocks = param_counts(config, mesh_shape)
    params = 4 * n_sharded
    heads = H // t if H % t == 0 else H
    attention = attention_impl(config.attention, config.dtype, config.dropout, platform or jax.default_backend(),
                               seq_len=T)
    fused = attention.impl in ("splash", "cudnn")
    per_layer_token = 4 * D * c + 12 * D * c // t + (heads * 4 if fused else heads * T * (8 + c))
    if config.remat == "full":
        activations = tokens * (L * D * c + per_layer_token)
        layers_kept = 2  # the layer being recomputed, and the next one's gathered weights
    else:
        if config.remat != "none":
            logging.info("memory: remat=%r is counted as 'none' (an upper bound)", config.remat)
        activations = tokens * L * per_layer_token
        layers_kept = L
    copies = c < 4 or f > 1  # the matmuls read a cast or all-gathered copy of the weights
    weights = (n_gathered - n_blocks + n_blocks * layers_kept // L) * c if copies else 0
    vocab = V // t if V % t == 0 else V
    chunk = loss_chunk_len(config.loss, config.loss_chunk, V, batch_size // (d * f), T)
    logits = tokens * vocab * 4 if chunk >= T else 2 * batch_size // (d * f) * chunk * vocab * 4
    return MemoryEstimate(
        params=params, opt_state=2 * params, grads=params * (2 if grad_accum > 1 else 1), weights=weights,
        activations=activations, logits=logits,
        batch=grad_accum * tokens * 8)


def mesh_shape_for(config: ConfigDict, n_devices: int) -> dict[str, int]:
    """The config's mesh sizes for `n_devices` devices, -1 resolved.

    Raises:
        ConfigError: the sizes cannot multiply to n_devices (the message of `sharding.make_mesh`).
    """
    sizes = {a: config.mesh[a] for a in sharding.MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for a, v in sizes.items():
        if v == -1:
            sizes[a] = n_devices // fixed if n_devices % fixed == 0 else -1
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"mesh: data={config.mesh.data} x fsdp={config.mesh.fsdp} x tensor={config.mesh.tensor} "
                          f"does not fit {n_devices} devices; make the product {n_devices} (or set one axis to -1)")
    return sizes


def vocab_size_for(config: ConfigDict) -> tuple[int, str]:
    """The vocabulary a scratch run of `config` trains with, and where it comes from.

    As `train.build_state` picks it: model.vocab_size when set, else the data folder's (its meta.json,
    GPT-2's 50,257 padded to 50,304 by `data.model_vocab_size`); when data.data_dir does not exist
    (data not prepared yet, or sizing for another machine), GPT-2's padded vocabulary.
    Raises DataError for a data folder whose meta cannot be read (`data.load_meta`).
    """
    if config.model.vocab_size:
        return config.model.vocab_size, "model.vocab_size"
    d = Path(config.data.data_dir)
    if d.is_dir():
        meta = data.load_meta(d)
        name = next((str(d / f) for f in ("meta.json", "meta.pkl") if (d / f).is_file()), str(d))
        return data.model_vocab_size(meta), f"{meta['tokenizer']} from {name}"
    return (data.model_vocab_size(data.NANOGPT_GPT2_META),
            f"GPT-2's {GPT2_VOCAB_SIZE:,} padded: no data folder {d}")


def model_config(config: ConfigDict, dtype: str) -> tuple[GPTConfig, str]:
    """The model the config trains, in compute dtype `dtype`: its own shape (vocabulary from
    `vocab_size_for`), or a GPT-2 size's for init_from a GPT-2 name, or an HF folder's config.json;
    and where its vocabulary comes from."""
    init = config.init_from
    if config_lib.is_pretrained_name(init):
        n_layer, n_head, n_embd = GPT2_SIZES[init]
        return config_lib.gpt_config(config, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dtype=dtype,
                                     vocab_size=config.model.vocab_size or GPT2_VOCAB_SIZE,
                                     block_size=min(config.model.block_size, 1024)), f"GPT-2 weights {init}"
    if init not in ("scratch", "resume"):
        from nanogpt_jax import convert

        m = config.model
        return convert.pretrained_config(init, dtype=dtype, block_size=m.block_size, scan_layers=m.scan_layers,
                                         remat=m.remat, attention=m.attention, loss=m.loss,
                                         loss_chunk=m.loss_chunk, dropout=m.dropout), \
            f"{init}/config.json"
    vocab_size, source = vocab_size_for(config)
    return config_lib.gpt_config(config, dtype=dtype, vocab_size=vocab_size), source


def format_table(est: MemoryEstimate, hbm_bytes: int | None = None) -> str:
    """The estimate as a table in GiB, and whether it fits `hbm_bytes` per device."""
    lines = [f"{name:<12}{value / GiB:>9.3f} GiB" for name, value in est.rows()]
    if hbm_bytes:
        share = est.total / hbm_bytes
        lines.append(f"{'fits' if share <= 1 else 'does NOT fit'}: {100 * share:.0f}% of {hbm_bytes / GiB:g} GiB")
    return "\n".join(lines)


def report(config: ConfigDict, devices: int | None = None, hbm_gib: float | None = None,
           platform: str | None = None) -> MemoryEstimate:
    """Print the estimate for the config's model, batch and mesh on `devices` devices (default: this
    machine's); with `hbm_gib`, whether it fits that much memory per device. `platform` ("cpu",
    "gpu", "tpu"; default this machine's) decides which attention model.attention=auto runs.

    Raises:
        UserError: it does not fit `hbm_gib` (after printing), so the CLI exits 1; ConfigError for a
            bad mesh or batch; DataError for an unreadable data folder.
    """
    n = devices or jax.device_count()
    shape = mesh_shape_for(config, n)
    dtype = config_lib.resolve_dtype(config.model.dtype)  # "auto" as training resolves it on this backend
    gcfg, vocab_source = model_config(config, dtype)
    B, A = config.train.batch_size, config.train.gradient_accumulation_steps
    platform = platform or jax.default_backend()
    est = estimate(gcfg, batch_size=B, grad_accum=A, mesh_shape=shape, platform=platform)
    auto = f" (model.dtype=auto on {jax.default_backend()})" if config.model.dtype == "auto" else ""
    attention = attention_impl(gcfg.attention, gcfg.dtype, gcfg.dropout, platform, seq_len=gcfg.block_size)
    print(f"{gcfg.n_layer} layers x {gcfg.n_embd} wide, {dtype}{auto}, remat={gcfg.remat}, attention "
          f"{attention.impl} on {platform}; {A} x {B} sequences x "
          f"{gcfg.block_size} tokens; {n} devices, mesh " + " ".join(f"{k}={v}" for k, v in shape.items()))
    print(f"vocabulary {gcfg.vocab_size:,} ({vocab_source})")
    hbm_bytes = int(hbm_gib * GiB) if hbm_gib else None
    print(format_table(est, hbm_bytes), flush=True)
    if hbm_bytes and est.total > hbm_bytes:
        raise UserError(f"the train step does not fit {hbm_gib:g} GiB per device ({est.total / GiB:.1f} GiB "
                        "estimated); shard more (mesh.fsdp), lower train.batch_size (raise "
                        "gradient_accumulation_steps) or set model.remat=full")
    return est


# A shape is refused only when its estimate exceeds the memory there is by this factor: the estimate is
# within -11%..+19% of XLA's compiled figure (module docstring), so a shape that fits is never refused.
MARGIN = 1.25


def available_bytes(device: jax.Device, local_devices: int) -> tuple[int, str]:
    """The memory one device's training step can use, in bytes, and what that figure is.

    An accelerator: its allocator's limit (`memory_stats()["bytes_limit"]`). CPU devices share the host's
    memory: what the host has available (psutil's `available`; a cgroup v2 limit when lower, as in a
    container or a SLURM job) divided by the `local_devices` of this process.
    """
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"per {device.platform.upper()} device"
    import psutil

    have, what = psutil.virtual_memory().available, "available on this host"
    try:  # a container's or job's own limit (cgroup v2), which the host's figure does not show
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            if left < have:
                have, what = left, "left under this cgroup's memory.max"
    except (OSError, ValueError):
        pass
    share = f", shared by {local_devices} CPU devices" if local_devices > 1 else ""
    return max(have // max(local_devices, 1), 0), what + share


def check_fits(config: ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Refuse, before anything is allocated or compiled, a training step the estimator says cannot fit
    (estimate > MARGIN x the memory there is, see `available_bytes`). On a CPU host the kernel would
    otherwise page for minutes and then kill the process (or a neighbour) without a word; an accelerator
    would fail only after its compile. train.check_memory=False skips the check.

    Raises:
        OutOfMemoryError: the step does not fit; the message gives both figures and the keys to change.
    """
    if not config.train.get("check_memory", True):
        return
    dtype = config_lib.resolve_dtype(config.model.dtype)
    gcfg, _ = model_config(config, dtype)
    platform = mesh.devices.flat[0].platform
    est = estimate(gcfg, batch_size=config.train.batch_size, grad_accum=config.train.gradient_accumulation_steps,
                   mesh_shape=dict(mesh.shape), platform=platform)
    have, what = available_bytes(jax.local_devices()[0], jax.local_device_count())
    if est.total > MARGIN * have:
        raise OutOfMemoryError(
            f"out of device memory (checked before the first step: the memory estimator gives the train step "
            f"{est.total / GiB:,.1f} GiB per device; {have / GiB:,.1f} GiB is {what}); {advice(config)}; to try "
            "it anyway: --config.train.check_memory=False")


def advice(config: ConfigDict) -> str:
    """What to change when a training step does not fit: the keys that set memory, and the estimator."""
    t, m = config.train, config.model
    return (f"lower train.batch_size={t.batch_size} (raise train.gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps} to keep the tokens per step), model.block_size={m.block_size}, set "
            f"model.remat=full, or shard with mesh.fsdp={config.mesh.fsdp}; estimate first: python -m "
            "nanogpt_jax.memory --config <this config> (README, Scaling)")


def main(config: ConfigDict) -> MemoryEstimate:
    """`python -m nanogpt_jax.memory`: `report` with the --devices and --hbm_gib flags."""
    return report(config, flags.FLAGS.devices, flags.FLAGS.hbm_gib, flags.FLAGS.platform)


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script, so that importing it
    # beside another module with a flag of the same name (e.g. --json) cannot fail
    flags.DEFINE_integer("devices", None, "devices of the mesh (default: this machine's)")
    flags.DEFINE_float("hbm_gib", None, "memory per device in GiB, to say whether the step fits")
    flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "where the step runs, for the attention "
                      "model.attention=auto picks (default: this machine's)")
    from nanogpt_jax import cli

    cli.main(main)


# ---- the host allocator on CPU devices -----------------------------------------------------------------

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Allocations below this come from the heap and are reused; above it they are mmapped afresh each time
CPU_HEAP_BYTES = 1 << 30


def keep_cpu_buffers_mapped(platform: str) -> bool:
    """On CPU devices, have glibc's malloc serve XLA's per-execution buffers (up to CPU_HEAP_BYTES) from
    its heap and keep them there when freed. Returns whether it changed the allocator.

    XLA:CPU allocates a step's temporaries as one block per execution (52 MB for the shakespeare_char
    cpu step). glibc mmaps any block above its dynamic threshold (at most 32 MB) and unmaps it on free,
    so every step page-faulted the whole block in again: 12,800 minor faults and ~35 ms of kernel CPU
    time per step on 2 cores, a third of the step. From the heap the block is reused: no faults, the
    same numbers (only where the memory comes from changes). The cost is resident memory: up to the
    largest freed block is kept rather than returned to the system. Nothing on GPU/TPU (their buffers
    are not malloc'd; the host's own allocations are left as glibc sets them), nor without glibc."""
    if platform != "cpu":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, CPU_HEAP_BYTES)) & bool(mallopt(_M_TRIM_THRESHOLD, CPU_HEAP_BYTES))
