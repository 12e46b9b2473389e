"""The evaluation tasks by name, for one model: loss, text, wikitext, hellaswag, sample.

`run_tasks` is what a training loop calls (flat "eval/..." metrics for the loggers);
`evaluate_source` is what nanogpt-eval calls for each model (a record for the report).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nanogpt.checkpoint import find_checkpoint
from nanogpt.config import EVAL_PROMPTS, EVAL_TASKS
from nanogpt.data.download import fetch
from nanogpt.data.loader import check_vocab, open_split, read_meta
from nanogpt.data.tokenizer import Tokenizer
from nanogpt.errors import ConfigError, DataError
from nanogpt.evaluate.common import inner, model_device
from nanogpt.evaluate.hellaswag import hellaswag_eval, load_hellaswag
from nanogpt.evaluate.loss import split_loss, text_tokens

log = logging.getLogger(__name__)

TASKS = EVAL_TASKS
# WikiText-2 raw, test split: a copy of HF's wikitext-2-raw-v1 without its empty lines (the mirror's file)
WIKITEXT = ("wikitext-2/wiki.test.raw", "https://raw.githubusercontent.com/Tylogi/TyloQuant/"
            "7989d038b13ca737da11a95fb90e77ae059f33c0/data/wikitext-2-raw/wiki.test.raw")


@dataclass
class TaskOptions:
    """What the tasks need besides the model (nanogpt-eval fills it from its config)."""

    data_dir: str | None = None  # loss: a prepared data dir
    split: str = "val"  # loss: which split
    text_files: Sequence[str] = ()  # text: raw text files
    stride: int | None = None  # loss / text / wikitext: window stride (None: the block size)
    batch_size: int = 8  # windows, or HellaSwag examples (x4 endings), per forward pass
    hellaswag_limit: int | None = None  # the first N examples (None: all 10,042)
    cache_dir: str = "data"  # downloads go to <cache_dir>/hellaswag/, <cache_dir>/wikitext-2/
    prompts: Sequence[str] = EVAL_PROMPTS  # sample
    max_new_tokens: int = 64  # sample
    seed: int = 1337  # sample
    device: torch.device | str | None = None  # None: where the model is
    dtype: torch.dtype | None = None  # autocast dtype; None: float32
    rank: int = 0
    world_size: int = 1
    progress: bool = False


@dataclass
class TaskResult:
    """One task's headline metrics, how much it scored, and how long it took."""

    metrics: dict[str, float]
    count: int = 0
    unit: str = "tokens"  # tokens | examples | samples
    seconds: float = 0.0
    samples: list[dict[str, str]] = field(default_factory=list)


def run_task(name: str, model: torch.nn.Module, tok: Tokenizer, opts: TaskOptions) -> dict[str, TaskResult]:
    """Run one task; returns its results by key (`text` gives one per file)."""
    t0 = time.perf_counter()
    if name == "loss":
        results = {"loss": _loss(model, opts)}
    elif name == "text":
        if not opts.text_files:
            raise ConfigError("the text task needs text_files=[...]")
        results = {_stem(f): _tokens(model, text_tokens(tok, f), _stem(f), opts) for f in opts.text_files}
    elif name == "wikitext":
        path = fetch(*WIKITEXT, Path(opts.cache_dir) / WIKITEXT[0])
        results = {"wikitext": _tokens(model, text_tokens(tok, path), "wikitext", opts)}
    elif name == "hellaswag":
        results = {"hellaswag": _hellaswag(model, tok, opts)}
    elif name == "sample":
        results = {"sample": _sample(model, tok, opts)}
    else:
        raise ConfigError(f"unknown task {name!r}; use {', '.join(TASKS)}")
    if len(results) == 1:
        next(iter(results.values())).seconds = time.perf_counter() - t0  # includes loading the data
    return results


def run_tasks(model: torch.nn.Module, tokenizer: Tokenizer, tasks: list[str],
              **options: Any) -> dict[str, float]:
    """Run tasks on a model; flat metrics for the loggers, e.g. {"eval/val_loss": 1.2,
    "eval/hellaswag_acc_norm": 0.29}. options: the fields of TaskOptions."""
    opts = TaskOptions(**options)
    metrics: dict[str, float] = {}
    for name in tasks:
        for result in run_task(name, model, tokenizer, opts).values():
            metrics.update({f"eval/{k}": v for k, v in result.metrics.items()})
            for s in result.samples:
                log.info("sample: %r", s["prompt"] + s["text"])
    return metrics


def _loss(model: torch.nn.Module, opts: TaskOptions) -> TaskResult:
    if not opts.data_dir:
        raise DataError("no data: pass data_dir=<a prepared data dir> (a training out_dir records its own)")
    meta = read_meta(opts.data_dir)
    check_vocab(meta, inner(model).config.vocab_size)
    return _tokens(model, open_split(opts.data_dir, opts.split, meta), opts.split, opts)


def _tokens(model: torch.nn.Module, tokens: Any, prefix: str, opts: TaskOptions) -> TaskResult:
    r = split_loss(model, tokens, stride=opts.stride, batch_size=opts.batch_size, device=opts.device,
                   dtype=opts.dtype, rank=opts.rank, world_size=opts.world_size, progress=opts.progress)
    metrics = {f"{prefix}_loss": r["loss"], f"{prefix}_ppl": r["ppl"]}
    return TaskResult(metrics, r["tokens"], "tokens", r["seconds"])


def _hellaswag(model: torch.nn.Module, tok: Tokenizer, opts: TaskOptions) -> TaskResult:
    examples = load_hellaswag(opts.cache_dir, opts.hellaswag_limit)
    r = hellaswag_eval(model, tok, examples, batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype,
                       rank=opts.rank, world_size=opts.world_size, progress=opts.progress)
    metrics = {"hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"]}
    return TaskResult(metrics, r["examples"], "examples", r["seconds"])


def _sample(model: torch.nn.Module, tok: Tokenizer, opts: TaskOptions) -> TaskResult:
    """A few seeded generations from fixed prompts (the same text every time for the same weights)."""
    from nanogpt.inference import encode_prompt
    from nanogpt.runtime import autocast

    device = torch.device(opts.device) if opts.device is not None else model_device(model)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    samples = []
    with autocast(device, opts.dtype or torch.float32):
        for prompt in opts.prompts:
            idx = encode_prompt(tok, prompt, device)  # (1, T)
            out = inner(model).generate(idx, opts.max_new_tokens, temperature=0.8, top_k=200,
                                        stop_token=tok.eot_token, generator=gen)
            new = out[0, idx.size(1) :].tolist()
            if tok.eot_token in new:
                new = new[: new.index(tok.eot_token)]
            samples.append({"prompt": prompt, "text": tok.decode(new)})
    return TaskResult({}, len(samples), "samples", samples=samples)


def _stem(path: str | Path) -> str:
    """A metric prefix for a text file: its name without .txt / .raw (wiki.test.raw -> wiki.test)."""
    name = Path(path).name
    for suffix in (".txt", ".raw"):
        name = name.removesuffix(suffix)
    return name


def recorded_data_dir(source: str) -> str | None:
    """The data_dir a training out_dir (or its checkpoint file) was trained on, if it records one."""
    path = Path(source)
    if not path.exists() or (path.is_dir() and (path / "config.json").is_file()):
        return None  # a GPT-2 name or an HF folder
    # mmap: read the config without reading the weights
    payload = torch.load(find_checkpoint(path), map_location="cpu", weights_only=True, mmap=True)
    return ((payload.get("config") or {}).get("data") or {}).get("data_dir")


def evaluate_source(source: str, tasks: Sequence[str], opts: TaskOptions, compile: bool = False) -> dict:
    """Load one model (an out_dir, a checkpoint file, a GPT-2 name or an HF folder) and run the
    tasks; returns its report record. A task this model cannot do (no data for `loss`, HellaSwag
    text a char vocabulary cannot encode) is skipped with a warning and noted under "errors"."""
    from nanogpt.inference import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(source, opts.device or "cpu")
    record: dict[str, Any] = {"model": source, "params": model.num_params(), "tokenizer": tok.name,
                              "metrics": {}, "tasks": {}, "samples": [], "errors": {}}
    runnable: torch.nn.Module = torch.compile(model) if compile else model  # type: ignore[assignment]
    opts = replace(opts, data_dir=opts.data_dir or recorded_data_dir(source))
    for name in tasks:
        if name == "sample" and opts.rank != 0:
            continue  # generation is not split across ranks; rank 0 writes the report
        try:
            results = run_task(name, runnable, tok, opts)
        except DataError as e:
            log.warning("%s: %s skipped: %s", source, name, e)
            record["errors"][name] = str(e)
            continue
        for key, r in results.items():
            record["metrics"].update(r.metrics)
            record["samples"] += r.samples
            rate = r.count / r.seconds if r.seconds > 0 else None
            record["tasks"][key] = {r.unit: r.count, "seconds": r.seconds, f"{r.unit}_per_sec": rate}
    del model, runnable
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # room for the next model
    return record
