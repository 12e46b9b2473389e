"""Evaluation behind `python run_eval.py --config ...` and the trainer's `train.eval_tasks`.

Tasks (`eval.tasks`), each reported under `eval/<key>/<metric>` (the same names in the JSON report,
the markdown table, TensorBoard and metrics.csv):

    loss       key loss/<split>    exact loss over every token of data_dir's <split>.bin
    text       key text/<stem>     the same over a text file, tokenized with the model's tokenizer
    wikitext2  key wikitext2       the same over WikiText-2's raw test file (GPT-2's published metric)
    hellaswag  key hellaswag       HellaSwag validation accuracy (see nanogpt_jax/hellaswag.py)
    lm_eval:a,b  keys lm_eval/a ...  lm-evaluation-harness tasks, their own metric names
                                   (nanogpt_jax/harness.py; the optional extra .[eval])

The three perplexity tasks report `loss` (mean nats per scored token), `ppl` = exp(loss) and `bpb`,
bits per byte: loss x tokens / ln 2 / the UTF-8 bytes those tokens decode to (GPT-2's <|endoftext|>
counts 0 bytes: it separates documents, it is not text). Every token after the first is scored
exactly once, with `batches.sliding_windows` of block_size tokens every `stride` tokens (so each token
sees at least block_size - stride tokens of context; stride = block_size is plain non-overlapping
windows). The wikitext2 default stride is block_size // 2: the recipe of Hugging Face's guide
"Perplexity of fixed-length models" (GPT-2, block 1024, stride 512).

Quick runs: `eval.max_examples` scores HellaSwag's first N examples and WikiText-2's first N windows
(the loss and text tasks always score every token). Long tasks log a progress line every
`progress.PROGRESS_SECONDS` (done/total, rate, eta) on process 0.

Scale: one jitted scorer returns each row's summed token losses for padded (N, K, T) batches, N
split over the mesh's data x fsdp devices, on every host at once: every process builds the same
global batch on the host (cheap), its devices score their rows, each process sums the rows it holds,
and the per-task totals are gathered from all processes once at the end. HellaSwag's endings and
the harness's requests are rows (`nanogpt_jax.rows`) scored by `scoring.score_rows`: sorted by length and
padded to a few length buckets (powers of two up to block_size), so a task compiles a handful of shapes.
Compute runs in the model's dtype (bfloat16 on accelerators by default), logits and the
log-softmax in float32 (`loss.token_losses`, the one loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, download, hellaswag, metrics, restore, sharding, storage, tokenizer
from nanogpt_jax.errors import ConfigError, DataError, UserError
from nanogpt_jax.model import GPT
from nanogpt_jax.scoring import Scorer, hellaswag_accuracy, perplexity
from nanogpt_jax.tokenizer import Tokenizer

TASKS = ("loss", "text", "wikitext2", "hellaswag")
# WikiText-2 raw, test split: HF's wikitext-2-raw-v1 test text without its empty lines, CRLF line ends
WIKITEXT2 = ("wikitext-2/wiki.test.raw", "https://raw.githubusercontent.com/Tylogi/TyloQuant/"
             "7989d038b13ca737da11a95fb90e77ae059f33c0/data/wikitext-2-raw/wiki.test.raw")
WIKITEXT2_NOTE = ("raw text, no detokenization; read as UTF-8 with universal newlines (CRLF -> LF); "
                  "no <|endoftext|> prepended, so the first token is context only")


# ---- config checks (run at start-up by config.validate) ---------------------------------------


def check_config(config: ConfigDict) -> None:
    """The eval section and train.eval_tasks: known task names, a text file for the text task."""
    if "eval" not in config:
        return
    for key in ("eval.tasks", "train.eval_tasks"):
        section, leaf = key.split(".")
        if section not in config or leaf not in config[section]:
            continue
        tasks = config[section][leaf]
        harness_tasks = [t for t in tasks if t.startswith(config_lib.LM_EVAL_PREFIX)]
        if harness_tasks and key == "train.eval_tasks":
            raise ConfigError(f"{key}={tuple(tasks)!r}: {harness_tasks[0]!r} is an lm-evaluation-harness task, run "
                              "by run_eval.py only (--config.eval.tasks); the trainer runs " + ", ".join(TASKS))
        unknown = [t for t in tasks if t not in TASKS and t not in harness_tasks]
        if unknown:
            raise ConfigError(f"{key}={tuple(tasks)!r}: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)} "
                              f"or {config_lib.LM_EVAL_PREFIX}<harness task>[,<task>...]")
        if "text" in tasks:
            path = config.eval.text_path
            if not path:
                raise ConfigError(f"{key} has text but eval.text_path is unset; pass --config.eval.text_path=FILE")
            if not os.path.isfile(path):
                raise ConfigError(f"eval.text_path={path!r}: no such file")
    if not config.eval.tasks:
        raise ConfigError("eval.tasks is empty; name at least one of " + ", ".join(TASKS))
    if config.eval.checkpoint not in ("latest", "best"):
        raise ConfigError(f"eval.checkpoint={config.eval.checkpoint!r}: must be latest or best")
    if "hellaswag_prompt" in config.eval and config.eval.hellaswag_prompt not in hellaswag.PROMPTS:
        raise ConfigError(f"eval.hellaswag_prompt={config.eval.hellaswag_prompt!r}: choose from "
                          + ", ".join(hellaswag.PROMPTS))


config_lib.EXTRA_CHECKS.append(check_config)


# ---- what each task scores ----------------------------------------------------------------------


@dataclasses.dataclass
class _Tokens:
    """A perplexity task's input: the token ids, the stride, the bytes they stand for, a description."""

    tokens: np.ndarray
    stride: int
    n_bytes: int | None
    info: dict


def token_byte_lengths(tok: Tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token id, int64 (n_vocab,); GPT-2's <|endoftext|> counts 0. None if unknown."""
    if tok.name == "char":
        return np.array([len(c.encode("utf-8")) for c in tok.chars], np.int64)
    if tok.name == "gpt2":
        import tiktoken  # the GPT2Tokenizer already pointed tiktoken at its files

        enc = tiktoken.get_encoding("gpt2")
        lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(tok.n_vocab)], np.int64)
        lengths[tok.eot_token] = 0
        return lengths
    return None


def count_bytes(tokens: np.ndarray, lengths: np.ndarray | None) -> int | None:
    """Bytes the scored tokens (all but the first) decode to, read in chunks (a memmap stays small)."""
    if lengths is None:
        return None
    total, chunk = 0, 1 << 22
    for start in range(1, len(tokens), chunk):
        ids = np.asarray(tokens[start:start + chunk], np.int64)
        total += int(lengths[np.minimum(ids, len(lengths) - 1)].sum())
    return total


def read_text(path: str | Path, tok: Tokenizer, what: str) -> np.ndarray:
    """A UTF-8 text file (universal newlines) as int32 token ids. Raises DataError when it is missing,
    unreadable, not encodable by `tok` or shorter than 2 tokens."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: cannot read {path} as UTF-8 text ({e})") from None
    try:
        ids = np.asarray(tok.encode(text), np.int32)
    except DataError as e:
        raise DataError(f"{what}: {path}: {e}") from None
    if len(ids) < 2:
        raise DataError(f"{what}: {path} is {len(ids)} {tok.name} token(s) long; at least 2 are needed to score a "
                        "prediction")
    return ids


def _harness_tasks(tasks: Sequence[str], include_path: str | None) -> tuple[list[str], Any] | None:
    """(names, TaskManager) of the lm_eval: entries of `tasks`, None without any; include_path is
    eval.lm_eval_include_path. Raises UserError when lm-eval is not installed (naming the extra) or a
    name is not a task the harness knows."""
    if not any(t.startswith(config_lib.LM_EVAL_PREFIX) for t in tasks):
        return None
    from nanogpt_jax import harness

    harness.require()
    names = harness.task_names(tasks)
    manager = harness.task_manager(include_path)
    harness.check_tasks(names, manager)
    return names, manager


def _check_loss_data(data_dir: str | Path) -> None:
    """Raises DataError when the loss task's folder is missing, pointing at the tasks that need none
    (pretrained weights come without data; their user need not prepare OpenWebText to evaluate them)."""
    if not data._is_folder(data_dir):
        raise DataError(f"the loss task reads data.data_dir={str(data_dir)!r}, which does not exist; choose "
                        "eval.tasks that need no data folder (text, wikitext2, hellaswag), e.g. "
                        "--config.eval.tasks=\"('wikitext2','hellaswag')\", or pass --config.data.data_dir=DIR, "
                        "a folder prepared with the model's tokenizer")


class Evaluator:
    """The tasks of one model on one mesh, prepared once (files read, tokenized, checked) and run as
    often as needed: `run(params)` -> {key: result dict}, `metrics(params)` -> {"eval/<key>/<m>": value}.

    Args:
        eval_config: the config's eval section.
        model: the GPT whose params will be passed to run.
        mesh: where to score; eval.batch_size is rounded up to a multiple of its data x fsdp size.
        tok: the model's tokenizer.
        tasks: task names (TASKS).
        data_dir: the loss task's folder: data.data_dir, or a checkpoint's, as `restore.load_model`
            found it with `data.find_data_dir`.
        cache_dir: data.cache_dir (where a gs:// data_dir's files are copied).
        apply_fn: a stand-in for the model's forward pass (tests); None: the model's.
        harness_tasks: (names, TaskManager) of the lm_eval: tasks, when `run` has checked them before
            loading the weights; None: checked here.
    Raises:
        DataError: a missing or unusable split or file, a tokenizer that does not fit the data, or
            hellaswag with a tokenizer other than GPT-2's.
        UserError: lm_eval: tasks without the [eval] extra, or a task the harness does not know.
        ConfigError: eval.stride above the model's block_size.
    """

    def __init__(self, eval_config: ConfigDict, model: GPT, mesh: Mesh, tok: Tokenizer, tasks: Sequence[str],
                 data_dir: str | Path, cache_dir: str | None = None, apply_fn: Callable | None = None,
                 harness_tasks: Any = None):
        e = eval_config
        self.model, self.mesh, self.tok, self.eval_config = model, mesh, tok, eval_config
        self.block_size = T = model.config.block_size
        d = sharding.batch_divisor(mesh)
        self.batch_size = -(-e.batch_size // d) * d
        if self.batch_size != e.batch_size:
            logging.info("eval.batch_size=%d rounded up to %d, a multiple of the %d devices the batch is split over",
                         e.batch_size, self.batch_size, d)
        if e.stride is not None and e.stride > T:
            raise ConfigError(f"eval.stride={e.stride}: must be <= the model's block_size={T}")
        self.scorer = Scorer(apply_fn or (lambda p, x: model.apply({"params": p}, x)), mesh)
        self.inputs: dict[str, Any] = {}
        # lm-evaluation-harness tasks: (names, its TaskManager), checked here unless `run` did (harness_tasks)
        self.harness = harness_tasks or _harness_tasks(tasks, e.lm_eval_include_path)
        lengths = token_byte_lengths(tok) if {"loss", "text", "wikitext2"} & set(tasks) else None
        for name in tasks:
            if name == "loss":
                tokens, info = self._split(e.split, model, tok, data_dir, cache_dir)
                self.inputs[f"loss/{e.split}"] = _Tokens(tokens, e.stride or T, count_bytes(tokens, lengths), info)
            elif name == "text":
                tokens = read_text(e.text_path, tok, "eval.text_path")
                self.inputs[f"text/{Path(e.text_path).stem}"] = _Tokens(
                    tokens, e.stride or T, count_bytes(tokens, lengths), {"path": str(e.text_path)})
            elif name == "wikitext2":
                path = download.fetch(*WIKITEXT2, Path(e.cache_dir) / WIKITEXT2[0])
                tokens, stride = read_text(path, tok, "wikitext2"), e.stride or max(1, T // 2)
                if e.max_examples:  # the first max_examples windows: the tokens they score, no more
                    tokens = tokens[:(e.max_examples - 1) * stride + T + 1]
                self.inputs["wikitext2"] = _Tokens(tokens, stride, count_bytes(tokens, lengths),
                                                   {"path": str(path), "detokenization": WIKITEXT2_NOTE,
                                                    "max_windows": e.max_examples})
            elif name == "hellaswag":
                if tok.name != "gpt2":
                    raise DataError(f"hellaswag needs a model with GPT-2's BPE tokenizer; this one uses a "
                                    f"{tok.n_vocab}-token {tok.name} vocabulary (from its training data); evaluate "
                                    "it with the loss or text task")
                examples = hellaswag.load(e.cache_dir, e.max_examples)
                self.inputs["hellaswag"] = [hellaswag.render(tok, ex, T, e.hellaswag_prompt) for ex in examples]
            elif name.startswith(config_lib.LM_EVAL_PREFIX):
                continue
            else:
                raise ConfigError(f"unknown eval task {name!r}; choose from {', '.join(TASKS)}")

    @staticmethod
    def _split(split: str, model: GPT, tok: Tokenizer, data_dir: str | Path,
               cache_dir: str | None) -> tuple[np.ndarray, dict]:
        _check_loss_data(data_dir)
        ds = data.Dataset(data_dir, block_size=1, model_vocab_size=model.config.vocab_size, splits=(split,),
                          cache_dir=cache_dir)
        if not tokenizer.same_vocabulary(ds.tokenizer, tok):
            raise DataError(f"{data_dir} was tokenized with a {ds.tokenizer.n_vocab}-token {ds.tokenizer.name} "
                            f"vocabulary, the model uses a {tok.n_vocab}-token {tok.name} one; evaluate on data "
                            "prepared for this model")
        tokens = ds.split(split)
        if len(tokens) < 2:
            raise DataError(f"{data_dir}/{split}.bin holds {len(tokens)} token(s); at least 2 are needed")
        return tokens, {"data_dir": str(data_dir), "split": split}

    def run(self, params: Any) -> dict[str, dict]:
        """Every task on `params` (each process passes its own shards); the same results on every process."""
        out = {}
        for key, inp in self.inputs.items():
            t0 = time.perf_counter()
            if key == "hellaswag":
                out[key] = {"prompt": self.eval_config.hellaswag_prompt,
                            **hellaswag_accuracy(self.scorer, params, inp, batch_size=self.batch_size,
                                                 block_size=self.block_size, label=key)}
            else:
                out[key] = {**inp.info, "block_size": self.block_size, "stride": inp.stride,
                            **perplexity(self.scorer, params, inp.tokens, block_size=self.block_size,
                                         stride=inp.stride, batch_size=self.batch_size, n_bytes=inp.n_bytes,
                                         label=key)}
            out[key]["seconds"] = seconds = time.perf_counter() - t0
            unit = "examples" if key == "hellaswag" else "tokens"
            out[key][f"{unit}_per_sec"] = out[key][unit] / seconds if seconds > 0 else None
            logging.info("eval %s: %s", key, ", ".join(f"{m}={v:.4f}" for m, v in out[key].items()
                                                      if m in METRICS and v is not None))
        if self.harness:
            out.update(self._run_harness(params))
        return out

    def _run_harness(self, params: Any) -> dict[str, dict]:
        from nanogpt_jax import harness

        names, manager = self.harness
        e, t0 = self.eval_config, time.perf_counter()
        lm = harness.NanoGPTLM(self.model, params, self.tok, self.mesh, batch_size=self.batch_size, stride=e.stride,
                               scorer=self.scorer)
        results = harness.evaluate_tasks(lm, names, manager, num_fewshot=e.num_fewshot, limit=e.max_examples)
        seconds = time.perf_counter() - t0
        for key, r in results.items():
            r["seconds_all_lm_eval_tasks"] = seconds
            logging.info("eval %s: %s", key, ", ".join(f"{m}={v:.4f}" for m, v in r.items()
                                                      if m in harness_metrics(r) and v is not None))
        return results

    def metrics(self, params: Any) -> dict[str, float]:
        """`run` flattened to logger names: {"eval/loss/val/loss": ..., "eval/hellaswag/acc": ...}."""
        return flat_metrics(self.run(params))


METRICS = ("loss", "ppl", "bpb") + hellaswag.METRICS


HARNESS_KEY = "lm_eval/"  # report keys of lm-evaluation-harness tasks: lm_eval/<task>
_HARNESS_INFO = ("version", "n_samples", "num_fewshot", "lm_eval_version", "seconds_all_lm_eval_tasks")


def harness_metrics(result: dict) -> list[str]:
    """The metric names of an lm_eval task's result (the harness's own: acc, acc_norm, word_perplexity,
    exact_match/strict-match, ...), without their _stderr companions."""
    return [m for m in result if m not in _HARNESS_INFO and not m.endswith("_stderr")]


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{"eval/<key>/<metric>": value} for the headline metrics of each task's result."""
    return {f"eval/{key}/{m}": v for key, r in results.items() for m, v in r.items() if v is not None
            and (m in harness_metrics(r) if key.startswith(HARNESS_KEY) else m in METRICS)}


# ---- the report ---------------------------------------------------------------------------------

_DIGITS = {"loss": 4, "ppl": 2, "bpb": 4, "acc": 4, "acc_norm_token": 4, "acc_norm_char": 4}


def markdown(report: dict) -> str:
    """The report as markdown: a table of our tasks (a row per task, a column per metric any task has),
    then one of lm-evaluation-harness tasks (a row per task and metric, the harness's names)."""
    ours = {k: r for k, r in report["tasks"].items() if not k.startswith(HARNESS_KEY)}
    theirs = {k: r for k, r in report["tasks"].items() if k.startswith(HARNESS_KEY)}
    m = report["model"]
    lines = [f"Model: {m['source']}" + (f" step {m['step']}" if "step" in m else "")
             + f" ({metrics.format_params(m['params'])} parameters, {m['tokenizer']} tokenizer, "
               f"{m['config']['dtype']}); "
             f"{report['devices']} devices, {report['wall_seconds']:.1f} s in all."]
    if ours:
        columns = [c for c in METRICS if any(r.get(c) is not None for r in ours.values())]
        lines += ["", "| task | " + " | ".join(columns) + " | scored | seconds | throughput |",
                  "|---|" + "---:|" * (len(columns) + 3)]
        for key, r in ours.items():
            unit = "examples" if "examples" in r else "tokens"
            rate = r.get(f"{unit}_per_sec")
            cells = [f"{r[c]:.{_DIGITS[c]}f}" if r.get(c) is not None else "-" for c in columns]
            cells += [f"{r[unit]:,} {unit}", f"{r['seconds']:.1f}", f"{rate:,.1f} {unit}/s" if rate else "-"]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if theirs:
        first = next(iter(theirs.values()))
        lines += ["", f"lm-evaluation-harness {first['lm_eval_version']} "
                  f"({first['seconds_all_lm_eval_tasks']:.1f} s for its tasks):", "",
                  "| task | version | n-shot | samples | metric | value | stderr |",
                  "|---|---|---:|---:|---|---:|---:|"]
        for key, r in theirs.items():
            for metric in harness_metrics(r):
                value, err = r[metric], r.get(f"{metric}_stderr")
                lines.append(f"| {key[len(HARNESS_KEY):]} | {r['version']} | {r['num_fewshot']} | {r['n_samples']} | "
                             f"{metric} | {'-' if value is None else f'{value:.4f}'} | "
                             f"{'-' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: str | Path) -> tuple[Path, Path]:
    """Write the report to json_path and its markdown table beside it (.md), each atomically."""
    json_path = storage.path(json_path)
    md_path = json_path.with_suffix(".md")
    try:
        storage.write_atomic(json_path, json.dumps(report, indent=2) + "\n")
        storage.write_atomic(md_path, markdown(report))
    except (OSError, UserError) as e:
        why = getattr(e, "strerror", None) or e
        raise DataError(f"cannot write the report {json_path} ({why}); choose another --config.eval.out") from None
    return json_path, md_path


def run(config: ConfigDict, out: TextIO | None = None) -> dict:
    """Evaluate the model `init_from` names on `eval.tasks`; print the table, write the report.

    The report (a dict, also returned): `model` (source, checkpoint step, GPTConfig, parameters,
    tokenizer), `tasks` (per task: its metrics, what was scored, seconds, throughput), `metrics` (the
    flat eval/<key>/<metric> names), `devices`, `processes`, `mesh`, `wall_seconds`, `config` (the settings,
    its model section the model that ran: a checkpoint's or HF folder's shape, not the config file's). Process 0
    writes it to eval.out (default out_dir/eval.json) and eval.md beside it.

    Raises UserError (one line) for bad input: config, checkpoint, data or text files.
    """
    t0 = time.time()
    if config.init_from == "scratch":
        raise ConfigError("init_from='scratch': nothing to evaluate; use resume (a training run's out_dir), a GPT-2 "
                          "name such as gpt2, or a Hugging Face folder")
    if config.init_from != "resume" and "loss" in config.eval.tasks:
        _check_loss_data(config.data.data_dir)  # before the weights are read
    harness_tasks = _harness_tasks(config.eval.tasks, config.eval.lm_eval_include_path)  # before the weights are read
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model, params, tok, source = restore.load_model(config, mesh=mesh, checkpoint=config.eval.checkpoint)
    logging.info("evaluating %s (%s, %s parameters) on %s", source.get("pretrained") or
                 f"{source['checkpoint']} step {source['step']}", model.config.dtype,
                 metrics.format_params(model.num_params()),
                 ", ".join(config.eval.tasks))
    evaluator = Evaluator(config.eval, model, mesh, tok, config.eval.tasks,
                          data_dir=source.get("data_dir") or config.data.data_dir, cache_dir=config.data.cache_dir,
                          harness_tasks=harness_tasks)
    results = evaluator.run(params)
    settings = json.loads(config.to_json())
    # the weights fix the shape (a checkpoint's, an HF folder's): record the model that ran, not the config file's
    settings["model"] = {k: getattr(model.config, k, v) for k, v in settings["model"].items()}
    report = {
        "model": {"source": source.get("pretrained") or config.init_from, **source,
                  "params": model.num_params(), "tokenizer": tok.name, "config": dataclasses.asdict(model.config)},
        "tasks": results, "metrics": flat_metrics(results), "batch_size": evaluator.batch_size,
        "devices": mesh.size, "processes": jax.process_count(), "mesh": dict(mesh.shape),
        "device_kind": jax.devices()[0].device_kind, "compilations": evaluator.scorer.jitted._cache_size(),
        "wall_seconds": time.time() - t0, "config": settings,
    }
    if harness_tasks:
        import lm_eval

        report["lm_eval"] = {"version": lm_eval.__version__, "tasks": harness_tasks[0],
                             "include_path": config.eval.lm_eval_include_path,
                             "num_fewshot": config.eval.num_fewshot, "limit": config.eval.max_examples}
    if jax.process_index() == 0:
        json_path, md_path = write_report(report, config.eval.out or storage.join(config.out_dir, "eval.json"))
        (out or sys.stdout).write(markdown(report))
        logging.info("wrote %s and %s", json_path, md_path)
    return report
