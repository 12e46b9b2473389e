"""nanogpt-bench: speed, memory and MFU of training, generation and data loading on this machine.

    nanogpt-bench                                            # train_shakespeare_char_cpu's step
    nanogpt-bench dtypes=[float32,bfloat16] compile=[false,true] batch_sizes=[8,16]
    nanogpt-bench mode=generate model=gpt2 batch_sizes=[1,4] generate.new_tokens=512
    nanogpt-bench mode=data            nanogpt-bench mode=profile
    nanogpt-bench --compare bench/a.json bench/b.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import hydra
from omegaconf import DictConfig

from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, BenchJob, register_configs, to_dataclass

register_configs()


def run(job: BenchJob) -> list[dict[str, Any]]:
    """Benchmark, print the markdown table and write <out>/<name>.json/.md/.png; or compare."""
    from nanogpt import bench  # heavy imports after argument parsing

    if job.compare:
        print(bench.compare_files(*job.compare), end="")
        return []
    job = replace(job, name=job.name or bench.default_name(job.mode, job.out))
    records = bench.run(job)
    paths = bench.write_outputs(records, job.out, job.name, job.chart)
    print(bench.markdown(records))
    print("wrote " + ", ".join(str(p) for p in paths))
    return records


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
@report_user_errors
def hydra_main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "bench_schema"))


@report_user_errors
def compare_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="nanogpt-bench --compare", description="b / a for every metric")
    p.add_argument("a", help="the baseline JSON written by nanogpt-bench")
    p.add_argument("b", help="the JSON to compare with it")
    args = p.parse_args(argv)
    run(BenchJob(compare=[args.a, args.b]))


def main() -> None:
    # Hydra owns argv; `--compare a.json b.json` (the same as compare=[a.json,b.json]) is read here
    if len(sys.argv) > 1 and sys.argv[1] == "--compare":
        compare_main(sys.argv[2:])
    else:
        hydra_main()


if __name__ == "__main__":
    main()
