"""Compile-only devices for the AOT tool: TPU slices and NVIDIA GPUs, on any machine.

JAX can compile for devices that are not attached (`jax.experimental.topologies`):
- **TPU**: libtpu, the TPU compiler, runs on any x86-64 Linux host. Names: Cloud TPU accelerator
  types (v4-8, v5e-8, v5litepod-16, v6e-8, ...) or JAX topologies (v5e:2x4, v4:2x2x1). A v4 or v5p
  chip has two TensorCores that JAX drives as one device (megacore): v4-8 is 4 devices of 32 GiB.
- **GPU**: the CUDA plugin (jax-cuda12-plugin + jax-cuda12-pjrt, ptxas from nvidia-cuda-nvcc-cu12 and
  cuDNN's version and graph libraries) compiles for a GPU described by XLA's target description
  (a `GpuTargetConfigProto` in text form: SM count, clocks, memory, cuDNN version), with no GPU and no
  driver. Names: `h100-8`, `h200-8`, `a100-8`, `a100-40g-8`, `8xH100` (1 to 8 GPUs are one host;
  16, 24, ... are hosts of 8, as in an HGX/DGX node), or `gpu-N` with `--gpu_target_config=FILE` (a
  description dumped on a real GPU by `python -m nanogpt_jax.device_check`). Shipped descriptions are
  in nanogpt_jax/gpu_targets/.

Where the compilers live. An importable libtpu or CUDA plugin makes *every* JAX program try that
accelerator first at start-up and print warnings on a machine without one, so `make install-aot`
(and `make test`) installs both outside the virtual environment's packages, in its `libtpu/` and
`cuda_aot/` folders, where this tool looks for them; elsewhere, name them for this tool only:
`TPU_LIBRARY_PATH=<dir>/libtpu/libtpu.so` (JAX's own variable) and `NANOGPT_CUDA_AOT_PATH=<dir>`
(ours: a `pip install --target <dir>` of the `gpu-aot` extra). The CUDA plugin is registered after
JAX's own backends have started, for topologies only: it never becomes a backend of the process.

Limits of a deviceless GPU compile (jax 0.10): XLA builds no cuDNN graph without a GPU (the fused
attention's workspace counts 0 bytes, and cuDNN has not yet accepted the configuration); there is no
autotuning (GEMM tiles are defaults, so no speed can be read from the program); jax's cuDNN checks
read the host's compute capability, which refuses head sizes above 128 off a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nanogpt_jax.errors import ConfigError

GiB = 1024**3
CUDA_AOT_ENV = "NANOGPT_CUDA_AOT_PATH"  # folder of the gpu-aot extra, installed with pip --target
TARGETS_DIR = Path(__file__).parent / "gpu_targets"

# HBM per chip (= per JAX device) in GiB, from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips of a slice -> its JAX topology shape. v5e/v6e: accelerator type = chips, 2-D torus;
# v4/v5p: accelerator type = TensorCores = 2 x chips, 3-D torus (Cloud TPU docs, "topologies").
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# GPU kinds -> their target description in gpu_targets/ (SXM boards: the 8-GPU HGX/DGX nodes'). "gpu"
# has none: it needs --gpu_target_config.
GPU_TARGETS = {"h100": "h100_sxm_80gb.txtpb", "h200": "h200_sxm_141gb.txtpb", "a100": "a100_sxm4_80gb.txtpb",
               "a100-40g": "a100_sxm4_40gb.txtpb", "gpu": None}
GPUS_PER_HOST = 8
# JAX's GPU client takes this fraction of the memory for its allocator at start-up, and no more
# (docs.jax.dev, "GPU memory allocation"); XLA_PYTHON_CLIENT_MEM_FRACTION changes it.
DEFAULT_GPU_MEM_FRACTION = 0.75
DEVICELESS_GPU_LIMITS = ("deviceless GPU compile: no autotuning (default GEMM tiles; no speed can be read from it), "
                         "no cuDNN graph built (the attention's workspace counts 0 bytes)")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Compile-only devices and what a program may use of each.

    hbm_bytes is what one device gives a JAX program: a TPU chip's HBM, or a GPU's memory times JAX's
    allocator fraction (`gpu_memory_fraction`); device_bytes is the whole memory.
    """

    name: str  # as given
    kind: str  # v4, v5e, v5p, v6e, h100, h200, a100, a100-40g, gpu
    platform: str  # "tpu" or "gpu"
    jax_name: str  # e.g. v5e:2x4, or 1x2x8 (partitions x hosts x GPUs per host) for GPUs
    devices: list
    device_bytes: int
    hbm_bytes: int
    hosts: int
    memory_note: str  # how hbm_bytes was found
    target_config: str | None = None  # GPUs: the description file compiled for

    @property
    def unit(self) -> str:
        return "chip" if self.platform == "tpu" else "GPU"


def topology(name: str, gpu_target_config: str | os.PathLike | None = None) -> Topology:
    """The compile-only devices named `name` (see the module docstring for the names).

    Args:
        name: a TPU slice (`v5e-8`, `v4-32`, `v5e:2x4`) or GPUs (`h100-8`, `8xH100`, `gpu-8`).
        gpu_target_config: a GpuTargetConfigProto text file to compile for instead of the kind's
            shipped one (required for `gpu-N`).

    Raises:
        ConfigError: an unknown name or size, a compiler that is not installed, or a target
            description that does not parse (one line each).
    """
    if re.fullmatch(r"v\d+[a-z]*[-:][\dx]+", name.strip().lower()):
        if gpu_target_config:
            raise ConfigError(f"--gpu_target_config is for GPU topologies, not the TPU slice {name!r}")
        return tpu_topology(name)
    return gpu_topology(name, gpu_target_config)


def tpu_topology(name: str) -> Topology:
    """The compile-only TPU devices of a slice named like `v5e-8`, `v4-32` or `v5e:2x4`.

    Raises:
        ConfigError: an unknown name or size, or libtpu is not installed.
    """
    m = re.fullmatch(r"(v\d+[a-z]*)[-:]([\dx]+)", name.strip().lower())
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in HBM_GIB:
        raise ConfigError(f"--topology={name!r}: not a TPU slice; use e.g. v5e-8, v4-8, v5p-8, v6e-8 or a JAX "
                          "topology such as v5e:2x4")
    megacore = gen in ("v4", "v5p")
    size = m.group(2)
    if "x" in size:
        shape = size
    else:
        chips = int(size) // 2 if megacore else int(size)
        shape = (_SHAPES_3D if megacore else _SHAPES_2D).get(chips)
        if shape is None:
            raise ConfigError(f"--topology={name!r}: no slice of that size in the table; give its shape, e.g. "
                              f"{gen}:2x2x4")
    from jax.experimental import topologies

    _off_a_tpu_vm()
    venv_libtpu = Path(sys.prefix, "libtpu", "libtpu", "libtpu.so")  # where `make install-aot` puts it
    if "TPU_LIBRARY_PATH" not in os.environ and importlib.util.find_spec("libtpu") is None and venv_libtpu.is_file():
        os.environ["TPU_LIBRARY_PATH"] = str(venv_libtpu)  # read by jax when it loads the compiler, just below
    kwargs = {"chip_config_name": "megacore"} if megacore else {}
    try:
        devices = topologies.get_topology_desc(f"{gen}:{shape}", "tpu", **kwargs).devices
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ConfigError("compiling for a TPU needs libtpu, outside this environment's packages so that CPU "
                              "runs do not try a TPU: pip install --target ~/libtpu libtpu and "
                              "TPU_LIBRARY_PATH=~/libtpu/libtpu/libtpu.so (as make test does); on a TPU VM, "
                              "pip install -e .[tpu]") from None
        raise ConfigError(f"--topology={name!r}: {str(e).splitlines()[0]}") from None
    hbm = HBM_GIB[gen] * GiB
    hosts = len({d.process_index for d in devices})
    return Topology(name, gen, "tpu", f"{gen}:{shape}", list(devices), hbm, hbm, hosts,
                    f"{HBM_GIB[gen]} GiB HBM per chip (Cloud TPU docs)")


def _off_a_tpu_vm() -> None:
    """libtpu asks the TPU VM's metadata for its slice and prints warnings when there is none, and
    lets one process at a time use it (a lock file); off a TPU VM, where it only compiles, tell it
    the answers (the compile-only topology does not depend on them) and drop the lock."""
    try:
        from jax._src import cloud_tpu_init  # private: set at `import jax` when TPU chips are attached

        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return  # a real TPU VM: leave its environment alone
    except ImportError:
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def parse_gpu_name(name: str) -> tuple[str, int, str]:
    """(kind, GPUs, JAX topology "partitions x hosts x GPUs per host") of `h100-8`, `8xH100`, `a100-40g-16`.

    Raises:
        ConfigError: not a GPU name, or a count that is neither 1-8 nor a multiple of 8.
    """
    s = name.strip().lower()
    kinds = "|".join(sorted(map(re.escape, GPU_TARGETS), key=len, reverse=True))
    m = re.fullmatch(rf"({kinds})-(\d+)", s) or re.fullmatch(rf"(\d+)x({kinds})", s)
    if m is None:
        raise ConfigError(f"--topology={name!r}: not a TPU slice or GPU topology; use e.g. v5e-8, h100-8, 8xH100, "
                          f"h200-8, a100-8, a100-40g-8, or gpu-8 with --gpu_target_config=FILE")
    kind, n = (m.group(1), int(m.group(2))) if m.group(1) in GPU_TARGETS else (m.group(2), int(m.group(1)))
    if 1 <= n <= GPUS_PER_HOST:
        return kind, n, f"1x1x{n}"
    if n > 0 and n % GPUS_PER_HOST == 0:
        return kind, n, f"1x{n // GPUS_PER_HOST}x{GPUS_PER_HOST}"
    raise ConfigError(f"--topology={name!r}: {n} GPUs; use 1 to {GPUS_PER_HOST} (one host) or a multiple of "
                      f"{GPUS_PER_HOST} (hosts of {GPUS_PER_HOST})")


def gpu_memory_fraction() -> float:
    """The fraction of a GPU's memory JAX's allocator may use: XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75
    (JAX's default; with XLA_PYTHON_CLIENT_ALLOCATOR=platform there is no pool: 1.0).

    Raises:
        ConfigError: XLA_PYTHON_CLIENT_MEM_FRACTION is not a number in (0, 1].
    """
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        return 1.0
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if value is None:
        return DEFAULT_GPU_MEM_FRACTION
    try:
        fraction = float(value)
        if not 0 < fraction <= 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: give a fraction in (0, 1], e.g. .9") from None
    return fraction


def gpu_topology(name: str, gpu_target_config: str | os.PathLike | None = None) -> Topology:
    """Compile-only NVIDIA GPUs: `parse_gpu_name(name)` GPUs of the kind's shipped description, or of
    the GpuTargetConfigProto text in `gpu_target_config`.

    Raises:
        ConfigError: a bad name, `gpu-N` without a description, a description that cannot be read or
            parsed (naming the field XLA refused), or the CUDA compiler is not installed.
    """
    kind, n, shape = parse_gpu_name(name)
    path = Path(gpu_target_config) if gpu_target_config else None
    if path is None:
        if GPU_TARGETS[kind] is None:
            raise ConfigError(f"--topology={name!r}: a generic GPU needs its description: --gpu_target_config=FILE "
                              "(python -m nanogpt_jax.device_check writes one on a real GPU)")
        path = TARGETS_DIR / GPU_TARGETS[kind]
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--gpu_target_config={str(path)!r}: cannot read it ({e.strerror or e})") from None
    size = re.search(r"\bdevice_memory_size:\s*(\d+)", text)
    if size is None:
        raise ConfigError(f"--gpu_target_config={str(path)!r}: no gpu_device_info.device_memory_size in it; is it a "
                          "GpuTargetConfigProto in text form?")
    devices = _cuda_devices(text, shape, path)
    device_bytes, fraction = int(size.group(1)), gpu_memory_fraction()
    note = f"{fraction:.0%} of {device_bytes / GiB:.1f} GiB: JAX's allocator fraction, XLA_PYTHON_CLIENT_MEM_FRACTION"
    hosts = int(shape.split("x")[1])
    return Topology(name, kind, "gpu", shape, devices, device_bytes, int(device_bytes * fraction), hosts, note,
                    str(path))


def _cuda_devices(target_config: str, shape: str, path: Path) -> list:
    from jax.experimental import topologies

    def devices() -> list:
        return list(topologies.get_topology_desc(platform="cuda", target_config=target_config,
                                                 topology=shape).devices)

    with _quiet_stderr() as said:
        try:
            try:
                return devices()
            except NotImplementedError:  # no CUDA plugin registered yet: ours, from NANOGPT_CUDA_AOT_PATH
                _register_cuda_compiler()
                return devices()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - XLA's refusal is a JaxRuntimeError; its detail went to stderr
            why, log = str(e).splitlines()[0], said()
    detail = re.search(r"Error parsing text-format [\w.]+: (.*)", log)
    if "parse" in why.lower():
        why = f"XLA cannot parse it ({detail.group(1).strip() if detail else why})"
    raise ConfigError(f"--gpu_target_config={str(path)!r}: {why}")


def _register_cuda_compiler() -> None:
    """Register the CUDA plugin from NANOGPT_CUDA_AOT_PATH after JAX's backends have started, so that it
    serves topologies only (a backend factory registered late is never started)."""
    import jax

    folder = os.environ.get(CUDA_AOT_ENV) or _venv_cuda_aot()
    if not folder or not Path(folder, "jax_plugins").is_dir():
        where = f"{CUDA_AOT_ENV}={folder!r} holds no jax_plugins folder; " if folder else ""
        raise ConfigError(f"compiling for NVIDIA GPUs needs the CUDA compiler: {where}run make install-aot (or pip "
                          f"install --target DIR the gpu-aot extra's packages) and set {CUDA_AOT_ENV}=DIR")
    jax.devices()  # start this process's own backends first (CPU here): the plugin must not become one
    if folder not in sys.path:
        sys.path.append(folder)
    # the plugin's initialize() checks the CUDA driver unless told not to; there is none to check
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    name = _cuda_plugin_module(folder)
    _check_jax_internals()
    importlib.import_module(name).initialize()
    _late_plugin_setup(name.replace("jax_plugins.xla_", "jax_") + "_plugin")


# What a plugin found at `import jax` gets and a late one does not, by jax 0.10's private names; checked
# before use, so that a jax that moved them gives one line instead of a wrong compile.
_JAX_INTERNALS = (("jax._src.lib", "cuda_versions"), ("jax._src.cudnn.fused_attention_stablehlo", "cuda_versions"),
                  ("jax._src.xla_bridge", "_plugin_callbacks"), ("jax._src.xla_bridge", "_backend_factories"))


def _check_jax_internals() -> None:
    for module, attr in _JAX_INTERNALS:
        if not hasattr(importlib.import_module(module), attr):
            raise ConfigError(f"this jax has no {module}.{attr}, which registering the CUDA compiler late needs: put "
                              f"{CUDA_AOT_ENV}'s folder on PYTHONPATH and set JAX_PLATFORMS=cpu before starting Python")


def _late_plugin_setup(plugin_package: str) -> None:
    """Give JAX what it hands a plugin it discovers at start-up: cuDNN's version module (looked up once at
    `import jax`, read by its cuDNN attention before lowering) and the plugin callbacks (among them
    the custom partitioner that a sharded cuDNN attention call needs)."""
    from jax._src import lib, xla_bridge
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if lib.cuda_versions is None:  # else: the plugin was importable at `import jax`
        lib.cuda_versions = fused.cuda_versions = importlib.import_module(f"{plugin_package}._versions")
    c_api = xla_bridge._backend_factories["cuda"].c_api
    for callback in xla_bridge._plugin_callbacks:
        callback(c_api=c_api)


def _venv_cuda_aot() -> str | None:
    """Where `make install-aot` puts the gpu-aot extra: the environment's cuda_aot folder, if there."""
    folder = Path(sys.prefix, "cuda_aot")
    return str(folder) if folder.is_dir() else None


def _cuda_plugin_module(folder: str) -> str:
    names = sorted(p.name for p in Path(folder, "jax_plugins").glob("xla_cuda*") if p.is_dir())
    if not names:
        raise ConfigError(f"{CUDA_AOT_ENV}={folder!r}: no jax_plugins/xla_cuda* in it; reinstall the gpu-aot extra")
    return f"jax_plugins.{names[-1]}"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator:
    """Send file descriptor 2 to a temporary file inside the block: the CUDA plugin's C++ start-up lines
    ("Could not find cuda drivers") and XLA's parse errors are not for the console. Yields a function
    returning what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lambda: (f.flush(), f.seek(0), f.read().decode(errors="replace"))[-1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
