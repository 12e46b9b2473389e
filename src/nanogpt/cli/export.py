"""nanogpt-export: `nanogpt-export checkpoint=out-shakespeare hf_dir=hf-out` writes an HF GPT-2 folder."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nanogpt.checkpoint import BEST, LATEST, find_checkpoint
from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, ExportJob, register_configs, to_dataclass

register_configs()


def run(job: ExportJob) -> Path:
    """Export the job's checkpoint; returns the folder written."""
    from nanogpt.hf import export_hf

    ckpt = find_checkpoint(job.checkpoint, BEST if job.prefer == "best" else LATEST)
    out = Path(job.hf_dir) if job.hf_dir else ckpt.parent / "hf"
    export_hf(ckpt, out, dtype=getattr(torch, job.dtype))
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {ckpt} to {out} ({files})")
    print(f'load it with transformers: GPT2LMHeadModel.from_pretrained("{out}")')
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "export_schema"))


if __name__ == "__main__":
    main()
