"""nanogpt-eval: exact loss/perplexity, HellaSwag and samples for several models, one report.

    nanogpt-eval models=[out-shakespeare-char-cpu] tasks=[loss]
    nanogpt-eval models=[gpt2,gpt2-medium] tasks=[hellaswag,text] text_files=[data/wiki.test.raw]
    torchrun --standalone --nproc_per_node=8 -m nanogpt.cli.eval models=[gpt2-xl] tasks=[hellaswag]
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, EvalJob, register_configs, to_dataclass
from nanogpt.errors import ConfigError

register_configs()


def check_sources(models: list[str]) -> None:
    """Fail before evaluating anything when a model is neither a path nor a GPT-2 name."""
    from nanogpt.hf import PRETRAINED

    missing = [m for m in models if m not in PRETRAINED and not Path(m).exists()]
    if missing:
        raise ConfigError(f"models: {', '.join(missing)} is neither an out_dir, a checkpoint file, "
                          f"an HF folder nor one of {', '.join(PRETRAINED)}")


def run(job: EvalJob) -> list[dict]:
    """Evaluate every model; rank 0 prints the table and writes <out>.json and <out>.md."""
    from nanogpt import distributed as D
    from nanogpt.evaluate import TaskOptions, default_out, evaluate_source, markdown_table, write_report
    from nanogpt.evaluate.report import samples_text
    from nanogpt.runtime import resolve_dtype

    check_sources(job.models)
    info = D.setup(job.system.device)
    try:
        # the job's keys of the same names (data_dir, stride, ...), plus where and how to run
        same = {f.name: getattr(job, f.name) for f in fields(TaskOptions) if hasattr(job, f.name)}
        opts = TaskOptions(**same, device=info.device, dtype=resolve_dtype(job.system.dtype, info.device),
                           rank=info.rank, world_size=info.world_size, progress=info.is_main)
        records = [evaluate_source(m, job.tasks, opts, compile=job.system.compile) for m in job.models]
        if info.is_main:
            json_path, md_path = write_report(records, job.out or default_out(job.models))
            print(markdown_table(records))
            if any(r["samples"] for r in records):
                print(samples_text(records))
            print(f"report: {json_path} {md_path}")
        return records
    finally:
        D.teardown()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "eval_schema"))


if __name__ == "__main__":
    main()
