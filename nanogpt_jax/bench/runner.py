"""run_bench.py's entry point: the mode's rows (nanogpt_jax/bench/<mode>.py), then the report.

`run` writes bench.out (+ .md, .png) and prints the table; `check_config` holds the bench section's
checks (registered in config.EXTRA_CHECKS when this module is imported). See nanogpt_jax/bench/__init__.py
for the modes.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax.bench import report
from nanogpt_jax.errors import ConfigError, DataError


def _rows(config: ConfigDict) -> list[dict[str, Any]]:
    mode = config.bench.mode
    if mode == "train":
        from nanogpt_jax.bench.train import bench_train

        return bench_train(config)
    if mode == "profile":
        from nanogpt_jax.bench.profile import bench_profile

        return bench_profile(config)
    if mode == "generate":
        from nanogpt_jax.bench.generate import bench_rows

        return bench_rows(config)
    from nanogpt_jax.bench.data import bench_rows

    return bench_rows(config)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the benchmark bench.mode names; print its table, write bench.out (+ .md, .png); returns
    the report (see nanogpt_jax.bench.report).

    Raises ConfigError/DataError (one line) for bad settings, bad data, or a bench.compare file that is
    unreadable or of another mode, before anything is written. A compare file with no matching
    configuration is said in one line after the table.
    """
    b = config.bench
    old = report.load(b.compare) if b.compare else None
    if old is not None and old["mode"] != b.mode:
        raise DataError(f"bench.compare={b.compare!r} is a {old['mode']} report; compare it with "
                        f"--config.bench.mode={old['mode']}")
    result = report.make_report(b.mode, _rows(config), config.to_dict())
    out = b.out or f"bench/{b.mode}.json"  # one file per mode: a generate run keeps the train figures
    paths = report.write(result, out)
    comparison = None
    if old is not None:
        try:
            comparison = report.compare(old, result, b.compare, out)
        except DataError as e:  # the figures are written; say why there are no ratios
            comparison = f"compare: {e}\n"
    report.print_report(result, paths, comparison)
    return result


def check_config(config: ConfigDict) -> None:
    """The bench section's own checks (registered in config.EXTRA_CHECKS)."""
    if "bench" not in config:
        return
    b = config.bench
    if b.mode not in report.MODES:
        raise ConfigError(f"bench.mode={b.mode!r}: must be one of {', '.join(report.MODES)}")
    bad = [v for v in b.batch_sizes if not isinstance(v, int) or v < 1]
    if bad:
        raise ConfigError(f"bench.batch_sizes={tuple(b.batch_sizes)!r}: each must be a positive integer")
    if b.peak_tflops is not None and b.peak_tflops <= 0:
        raise ConfigError(f"bench.peak_tflops={b.peak_tflops}: must be > 0 (TFLOP/s of one device)")


if check_config not in config_lib.EXTRA_CHECKS:
    config_lib.EXTRA_CHECKS.append(check_config)
