"""nanogpt-sample: stream samples from a trained out_dir, a checkpoint or a pretrained model."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from nanogpt.cli import report_user_errors
from nanogpt.config import CONFIG_DIR, SampleJob, register_configs, to_dataclass

register_configs()


def run(job: SampleJob) -> list[str]:
    """Print `num_samples` samples to stdout as they are generated; returns them."""
    from nanogpt.distributed import resolve_device
    from nanogpt.inference import encode_prompt, load_model_and_tokenizer, read_prompt, stream_text
    from nanogpt.runtime import autocast, compile_if_possible, resolve_dtype

    device = resolve_device(job.system.device)
    model, tok = load_model_and_tokenizer(job.out_dir if job.init_from == "resume" else job.init_from, device)
    if job.system.compile:
        model = compile_if_possible(model, device)  # type: ignore[assignment]
    text = read_prompt(job.start)
    prompt = encode_prompt(tok, text, device)
    gen = torch.Generator(device=device).manual_seed(job.seed)
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    samples = []
    with autocast(device, resolve_dtype(job.system.dtype, device)):
        for _ in range(job.num_samples):
            write(text)
            samples.append(text + stream_text(model, tok, prompt, job.max_new_tokens, write, stop=job.stop_at_eot,
                                       temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                                       generator=gen))
            write("\n---------------\n")
    return samples


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(to_dataclass(cfg, "sample_schema"))


if __name__ == "__main__":
    main()
