"""lm-evaluation-harness (EleutherAI's `lm-eval`, 0.4.x) on our models: the harness model `nanogpt_jax`.

    python run_eval.py --config configs/tiny.py --config.init_from=resume \\
        --config.eval.tasks="('lm_eval:arc_easy,piqa',)"
    python -m nanogpt_jax.harness --model nanogpt_jax --model_args out_dir=out-tiny,checkpoint=best --tasks hellaswag

The harness asks a model three things; `NanoGPTLM` answers each with this library's own machinery:

    loglikelihood          log P(continuation | context) and whether greedy decoding would produce it:
                           tokenized as the harness's TemplateLM does (the context's trailing spaces move
                           to the continuation; context + continuation encoded whole, then split), cut
                           from the left to block_size + 1 tokens (`rows.continuation_row`), scored by
                           `scoring.score_rows` (the scorer behind our HellaSwag: rows sorted by length,
                           padded to a few buckets, jitted batches over the mesh's data x fsdp devices and
                           every host)
    loglikelihood_rolling  the summed log-likelihood of a whole text: the windows of our `text` task
                           (`batches.window_spans`, stride eval.stride, default block_size: the harness's own
                           disjoint rolling windows), each token scored once, through the same rows. With
                           GPT-2's BPE the text is preceded by <|endoftext|>, so its first token is scored
                           too (the harness's prefix token); a char vocabulary has none, so its first
                           character is context only
    generate_until         our KV-cache sampler (`generate.stream`, as run_sample.py), greedy unless the
                           request asks `do_sample` with a temperature; prompts of one length and options go
                           together as a batch; a row stops at <|endoftext|>, at max_gen_toks (default 256),
                           or once its text holds one of the `until` strings, and is cut before that string

Every process runs the harness over all requests (it sees rank 0 of 1): our jitted scoring calls
are the collective ones, so every host computes its share of each batch and gets every result.
generate_until is tested on one host only (the sampler takes its prompt as a local array).

lm-eval 0.4 finds models only in its own registry, filled when a module that registers one is
imported (it reads no entry points), so the shell command is this module: it registers
`nanogpt_jax`, then runs lm-eval's own command line with the arguments given (`lm-eval run`, `ls`,
`validate`; any of its flags). lm-eval's own models (`--model hf`, `dummy`, ...) work through it as
through `lm-eval`. For `--model nanogpt_jax` it adds `pretrained=<out_dir or init_from>` to
--model_args, the key lm-eval names its results folder and report after; an unknown --tasks name is one
line with close matches. A Python program can `import nanogpt_jax.harness` and call
`lm_eval.simple_evaluate(model="nanogpt_jax", model_args="out_dir=...")` itself.

model_args: out_dir (a training run; init_from=resume) or init_from (a GPT-2 name or Hugging Face
folder); checkpoint (latest | best), data_dir (the tokenizer's folder when the run's is elsewhere),
dtype (auto | float32 | bfloat16), stride, mesh_data / mesh_fsdp / mesh_tensor (as configs' mesh
section). --batch_size N is requests per jitted call (rounded up to the devices; auto: 8 per device).
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, generate, restore, rows, scoring, sharding
from nanogpt_jax.batches import window_spans
from nanogpt_jax.errors import ConfigError, UserError
from nanogpt_jax.model import GPT
from nanogpt_jax.progress import Progress
from nanogpt_jax.tokenizer import Tokenizer

try:  # the optional extra: without it only `require` (and its one-line error) is of use
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    lm_eval = None
    TemplateLM = object

MODEL_NAME = "nanogpt_jax"
PREFIX = config_lib.LM_EVAL_PREFIX  # eval.tasks entries naming harness tasks: "lm_eval:arc_easy,piqa"
MISSING_EXTRA = ("lm_eval: tasks need EleutherAI's lm-evaluation-harness, an optional extra: "
                 "pip install -e '.[eval]' (or pip install 'lm-eval>=0.4.13')")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until requests without max_gen_toks


def require() -> None:
    """Raises UserError (one line naming the extra) when lm-eval is not installed."""
    if lm_eval is None:
        raise UserError(MISSING_EXTRA)


def task_names(entries: Sequence[str]) -> list[str]:
    """The harness task names in eval.tasks entries: "lm_eval:arc_easy,piqa" -> [arc_easy, piqa].
    Raises ConfigError for an entry that names none."""
    names = []
    for entry in entries:
        if entry.startswith(PREFIX):
            found = [t.strip() for t in entry[len(PREFIX):].split(",") if t.strip()]
            if not found:
                raise ConfigError(f"eval.tasks entry {entry!r} names no task; write e.g. 'lm_eval:arc_easy,piqa'")
            names += found
    return names


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None, include_defaults: bool = True) -> Any:
    """The harness's TaskManager: its own tasks (unless include_defaults=False) and the YAMLs under
    include_path. Indexing its ~15,000 tasks takes seconds, so it is built once per process."""
    require()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(names: Sequence[str], manager: Any,
                include: str = "--config.eval.lm_eval_include_path=DIR of YAMLs") -> None:
    """Raises ConfigError naming the first task (or group, tag) the harness does not know, with close
    matches; `include` is how this command adds task YAMLs."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(f"unknown lm_eval task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close
                              else "") + f"; lm-eval {lm_eval.__version__} lists its {len(known)} tasks with "
                              "`python -m nanogpt_jax.harness ls tasks`; a task of your own: " + include)


class NanoGPTLM(TemplateLM):
    """An lm-evaluation-harness model over a loaded GPT (see the module docstring for the semantics).

    Args:
        model, params, tok: what `restore.load_model` returns (params placed on `mesh`).
        mesh: where to score and generate.
        batch_size: global rows per jitted scoring call and prompts per generation batch; rounded
            up to a multiple of the mesh's data x fsdp devices.
        stride: loglikelihood_rolling's window stride in tokens (1 .. block_size); None = block_size.
        source: a description of the weights for the harness's report (`get_model_info`).
        scorer: an `scoring.Scorer` of this model on this mesh to share (and its compilations).
    """

    backend = "causal"  # TemplateLM._encode_pair: encode context + continuation whole, then split

    def __init__(self, model: GPT, params: Any, tok: Tokenizer, mesh: jax.sharding.Mesh, *, batch_size: int = 8,
                 stride: int | None = None, source: dict | None = None, scorer: scoring.Scorer | None = None):
        require()
        super().__init__()
        self.model, self.params, self.tok, self.mesh = model, params, tok, mesh
        self.block_size = model.config.block_size
        d = sharding.batch_divisor(mesh)
        self.batch_size = -(-int(batch_size) // d) * d
        self.stride = stride or self.block_size
        if not 1 <= self.stride <= self.block_size:
            raise ConfigError(f"stride={stride}: must lie in 1 .. the model's block_size={self.block_size}")
        self.scorer = scorer or scoring.Scorer(lambda p, x: model.apply({"params": p}, x), mesh)
        self.source = source or {}

    @classmethod
    def load(cls, out_dir: str | None = None, init_from: str | None = None, checkpoint: str = "latest",
             data_dir: str = data.DEFAULT_DATA_DIR, dtype: str = "auto", batch_size: Any = None,
             stride: int | None = None, mesh_data: int = -1, mesh_fsdp: int = 1, mesh_tensor: int = 1,
             **harness_args: Any) -> NanoGPTLM:
        """The model of `--model_args` (see the module docstring); harness_args (device, max_batch_size)
        are the harness's own and ignored: the mesh decides. Raises UserError for bad values."""
        harness_args.pop("pretrained", None)  # the run's name, for lm-eval's reports (see `main`)
        unknown = sorted(set(harness_args) - {"device", "max_batch_size"})
        if unknown:
            raise ConfigError(f"model_args: unknown key {unknown[0]!r}; known: out_dir, init_from, checkpoint, "
                              "data_dir, dtype, batch_size, stride, mesh_data, mesh_fsdp, mesh_tensor")
        if (out_dir is None) == (init_from is None):
            raise ConfigError("model_args: give out_dir=DIR (a training run) or init_from=NAME (gpt2, gpt2-medium, "
                              "... or a Hugging Face folder), one of them")
        if checkpoint not in ("latest", "best"):
            raise ConfigError(f"model_args checkpoint={checkpoint!r}: must be latest or best")
        config = ConfigDict({
            "init_from": "resume" if out_dir is not None else str(init_from), "out_dir": str(out_dir or "."),
            "model": {"dtype": str(dtype), "attention": "auto", "loss": "chunked", "loss_chunk": 0,
                      "block_size": 1 << 30},
            "data": {"data_dir": str(data_dir)}, "sample": {"checkpoint": checkpoint}})
        mesh = sharding.make_mesh(int(mesh_data), int(mesh_fsdp), int(mesh_tensor))
        try:
            model, params, tok, source = restore.load_model(config, mesh=mesh, checkpoint=checkpoint)
        except UserError as e:  # said in run_sample.py's terms: this command's are model_args
            raise type(e)(str(e).replace("--config.out_dir", "out_dir= in --model_args")
                          .replace("--config.data.data_dir", "data_dir= in --model_args")) from None
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8 * sharding.batch_divisor(mesh)
        return cls(model, params, tok, mesh, batch_size=int(batch_size), stride=None if stride is None else int(stride),
                   source=source)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NanoGPTLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> NanoGPTLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.load(**{**extra, **arg_dict})

    # ---- what TemplateLM needs -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int | None:
        return self.tok.eot_token

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"nanogpt_jax-{self.tok.name}-{self.tok.n_vocab}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_source": MODEL_NAME, "model_num_parameters": self.model.num_params(),
                "model_dtype": self.model.config.dtype, "model_revision": str(self.source)}

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) from TemplateLM.loglikelihood."""
        token_rows, n_scored = [], []
        for _, ctx, cont in requests:
            if ctx == [None]:  # an empty context and no <|endoftext|> (a char vocabulary): the harness's own
                ctx, cont = cont[:1], cont[1:]  # fallback, the continuation's first token is the context
            row, n = rows.continuation_row(ctx, cont, self.block_size)
            token_rows.append(row)
            n_scored.append(n)
        scorable = [i for i, n in enumerate(n_scored) if n > 0]  # an empty continuation has log-likelihood 0
        nll, greedy = np.zeros(len(requests)), np.ones(len(requests), bool)
        if scorable:
            progress = Progress("lm_eval loglikelihood", len(scorable), "requests")
            nll[scorable], greedy[scorable], _ = scoring.score_rows(
                self.scorer, self.params, [token_rows[i] for i in scorable], [n_scored[i] for i in scorable],
                batch_size=self.batch_size, block_size=self.block_size, greedy=True, progress=progress)
        out = [(-float(v), bool(g)) for v, g in zip(nll, greedy, strict=True)]
        for (pair, _, _), result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The summed log-likelihood of each request's text (nats, negative), its windows scored together."""
        prefix = [] if self.tok.eot_token is None else [self.tok.eot_token]
        token_rows, n_scored, owner = [], [], []
        for i, req in enumerate(requests):
            ids = prefix + self.tok.encode(req.args[0])
            if len(ids) < 2:
                continue  # nothing to predict: log-likelihood 0
            for start, first, length in window_spans(len(ids), block_size=self.block_size, stride=self.stride):
                token_rows.append(tuple(ids[start:start + length + 1]))
                n_scored.append(length - first)
                owner.append(i)
        totals = np.zeros(len(requests))
        if token_rows:
            progress = Progress("lm_eval loglikelihood_rolling", len(token_rows), "windows")
            nll, _, _ = scoring.score_rows(self.scorer, self.params, token_rows, n_scored,
                                            batch_size=self.batch_size, block_size=self.block_size,
                                            progress=progress)
            np.add.at(totals, np.array(owner), nll)
        out = [-float(t) for t in totals]
        for req, result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), result)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each request's context, cut before the first `until` string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prompts, options = [], []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok.encode(context)[-self.block_size:]  # the sampler sees no more than this anyway
            if not ids:
                ids = [self.tok.eot_token if self.tok.eot_token is not None else 0]
            prompts.append(ids)
            options.append((tuple(until), max_gen, temperature))
            groups.setdefault((len(ids), max_gen, temperature), []).append(i)
        progress = Progress("lm_eval generate_until", len(requests), "requests")
        for (_, max_gen, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], [options[i][0] for i in batch], max_gen,
                                       temperature)
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], untils: list[tuple[str, ...]], max_gen: int,
                  temperature: float) -> list[str]:
        """Greedy (temperature 0) or sampled continuations of equally long prompts, stopping early once
        every row has met <|endoftext|> or one of its until strings; each text is cut before it."""
        idx_BT = np.asarray(prompts, np.int32)
        eot = self.tok.eot_token
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with sharding.activate(self.mesh):
            for tok_B in generate.stream(self.model, self.params, idx_BT, max_gen, temperature=temperature,
                                         rng=jax.random.key(0), stop_token=eot, vocab_limit=self.tok.n_vocab):
                for b, t in enumerate(np.asarray(tok_B).tolist()):
                    if done[b]:
                        continue
                    if t == eot:
                        done[b] = True
                        continue
                    new[b].append(t)
                    if untils[b] and any(u in self.tok.decode(new[b]) for u in untils[b]):
                        done[b] = True
                if all(done):
                    break
        texts = []
        for ids, until in zip(new, untils, strict=True):
            text = self.tok.decode(ids)
            for u in until:
                text = text.split(u, 1)[0]
            texts.append(text)
        return texts


if lm_eval is not None:
    # lm-eval fills its registry with its own models (lazily: names only) only while the registry is empty
    # (`lm_eval.api.registry.get_model`): they go in first, or `--model hf` / `dummy` would be unknown
    import lm_eval.models  # noqa: F401

    register_model(MODEL_NAME)(NanoGPTLM)


def evaluate_tasks(lm: NanoGPTLM, names: Sequence[str], manager: Any, *, num_fewshot: int | None = None,
                   limit: int | None = None) -> dict[str, dict]:
    """Run harness tasks on `lm`: {"lm_eval/<task>": {metric: value, "<metric>_stderr": ..., "version",
    "n_samples", "num_fewshot", "lm_eval_version"}} with the harness's own metric names (a metric of a
    filter other than "none" is named "<metric>/<filter>"), the same on every process."""
    # the harness bootstraps some stderrs in a forked process pool, which a process running jax must not
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # fork: the same draws, in this process
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:  # datasets' offline and not-found errors subclass these
        raise _dataset_error(names, e, "eval.lm_eval_include_path") from None
    out = {}
    for task, metrics in results["results"].items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            entry[name] = None if isinstance(value, float) and not np.isfinite(value) else float(value)
        samples = results.get("n-samples", {}).get(task, {})
        entry.update({"version": results.get("versions", {}).get(task), "n_samples": samples.get("effective"),
                      "num_fewshot": results.get("n-shot", {}).get(task), "lm_eval_version": lm_eval.__version__})
        out[f"lm_eval/{task}"] = entry
    return out


def _dataset_error(names: Sequence[str], e: BaseException, include: str) -> UserError:
    why = " ".join(str(e).split())[:200]
    return UserError(f"lm_eval tasks {', '.join(names)}: a dataset could not be loaded ({why}); offline, fill "
                     "the Hugging Face cache (HF_HOME) on a machine with a network, or define the task by a local "
                     f"YAML over local files ({include})")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m nanogpt_jax.harness ARGS`: lm-eval's command line with the `nanogpt_jax` model
    registered; a UserError (bad model_args, a checkpoint without a tokenizer) is one line, exit 1."""
    from nanogpt_jax import cli
    from nanogpt_jax.errors import fail

    if lm_eval is None:
        fail(MISSING_EXTRA)
    from lm_eval.__main__ import cli_evaluate

    args = _name_the_run(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0], *args]
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # no forked bootstrap pool in a process running jax
    logging.use_absl_handler()  # our libraries' lines as run_eval.py shows them (orbax's quiet)
    logging.get_absl_handler().addFilter(cli._quiet_libraries)
    try:
        _check_task_names(args)
        cli_evaluate()
    except UserError as e:
        fail(str(e))
    except (ConnectionError, FileNotFoundError) as e:  # datasets' offline and not-found errors subclass these
        fail(str(_dataset_error([_flag(args, "tasks")[1] or "?"], e, "--include_path DIR")))


def _flag(args: Sequence[str], name: str) -> tuple[int, str | None]:
    """Where `--name VALUE` or `--name=VALUE` is in `args` (the index of the value; -1 if absent), and VALUE."""
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            return i + 1, args[i + 1]
        if arg.startswith(f"--{name}="):
            return i, arg.split("=", 1)[1]
    return -1, None


# the model_args keys lm-eval reads a run's name from, in its order (its GeneralConfigTracker._get_model_name)
_NAME_KEYS = ("peft", "delta", "pretrained", "model", "path", "engine")


def _name_the_run(args: list[str]) -> list[str]:
    """For `--model nanogpt_jax`: add `pretrained=<out_dir or init_from>` to --model_args, the key lm-eval names
    its results folder and report after (without one it makes up a random name such as wxrd1574)."""
    _, model = _flag(args, "model")
    i, model_args = _flag(args, "model_args")
    if model != MODEL_NAME or model_args is None:
        return args
    pairs = dict(kv.split("=", 1) for kv in model_args.split(",") if "=" in kv)
    name = pairs.get("out_dir") or pairs.get("init_from")
    if name is None or any(key in pairs for key in _NAME_KEYS):
        return args
    named = f"{model_args},pretrained={name.rstrip('/')}"
    return [*args[:i], named if args[i] == model_args else f"--model_args={named}", *args[i + 1:]]


def _check_task_names(args: Sequence[str]) -> None:
    """An unknown --tasks name is one line with close matches, as in run_eval.py (lm-eval's own error is a
    traceback). Names that are files or folders (task YAMLs) are lm-eval's to read."""
    _, tasks = _flag(args, "tasks")
    if not tasks or tasks in ("list", "list_groups", "list_tags", "list_subtasks"):
        return
    _, include_path = _flag(args, "include_path")
    names = [t.strip() for t in tasks.split(",") if t.strip() and not os.path.exists(t.strip())]
    if names:
        check_tasks(names, task_manager(include_path), include="--include_path DIR of YAMLs")


if __name__ == "__main__":
    main()
