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
rows of the batch (`data.TrainBatches`). On CPU the processes exchange arrays through gloo
(`jax_cpu_collectives_implementation`), which is how the tests run two processes on one machine.

`jax.distributed.initialize` also starts JAX's preemption service: a SIGTERM to any process is
relayed to all, and `preemption_sync_point(step)` then returns True on every process at the same
step, the step they all save (see train.py).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax.errors import ConfigError

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
    try:
        jax.distributed.initialize(**given)
    except (ValueError, TypeError) as e:  # e.g. a process id but no process count, outside a cluster
        raise ConfigError(f"multi-process run: {e} (set dist.coordinator_address, dist.num_processes and "
                          "dist.process_id)") from None
    logging.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


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
    if d.coordinator_address is not None and not re.fullmatch(r"\S+:\d+", d.coordinator_address):
        raise ConfigError(f"dist.coordinator_address={d.coordinator_address!r}: must be host:port of process 0, "
                          "e.g. 10.0.0.2:1234")


config_lib.EXTRA_CHECKS.append(_check)
