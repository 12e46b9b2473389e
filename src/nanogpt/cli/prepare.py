"""nanogpt-prepare: tokenize a dataset into <data_dir>/{train,val}.bin + meta.json.

    nanogpt-prepare data=shakespeare_char
    nanogpt-prepare data=text data.input='my/folder/*.txt' data.tokenizer=char data.data_dir=data/mine
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, PrepareJob, register_configs, to_dataclass

register_configs()


def run(job: PrepareJob) -> dict:
    """Prepare `job.data` and print one line per split; returns the meta.json contents."""
    from nanogpt.data.prepare import prepare

    meta = prepare(job.data)
    for split, info in meta["splits"].items():
        kind = f"{meta['tokenizer']}, {meta['dtype']}"
        print(f"{job.data.data_dir}/{split}.bin: {info['tokens']:,} tokens ({kind})")
    return meta


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "prepare_schema"))


if __name__ == "__main__":
    main()
