"""nanogpt-train: `nanogpt-train --config-name=train_shakespeare_char_cpu model.n_layer=6 ...`

Launch on several GPUs or nodes with torchrun:
`torchrun --nproc_per_node=8 -m nanogpt.cli.train --config-name=train_gpt2`
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from omegaconf import DictConfig

from nanogpt import distributed
from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, TrainJob, register_configs, to_dataclass

register_configs()


def run(job: TrainJob) -> dict[str, Any]:
    """Train one job in this process (one rank of a torchrun launch, or alone)."""
    from nanogpt.trainer import Trainer  # heavy imports after argument parsing

    info = distributed.setup(job.system.device)
    try:
        summary = Trainer(job, info).train()
    finally:
        distributed.teardown()
    if info.is_main:
        print(json.dumps(summary, indent=2))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train_gpt2")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "train_schema"))


if __name__ == "__main__":
    main()
