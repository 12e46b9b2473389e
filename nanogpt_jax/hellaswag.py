"""HellaSwag (Zellers et al. 2019), completion style: the data, the prompts and the three accuracies.

Each validation example is a context and four endings, one of them right (`label`). The model reads
the context tokens followed by each ending encoded with a leading space (`encode(" " + ending)`), and
only the ending's tokens are scored: the sum of their log-probabilities is the ending's score.
Two prompts (`eval.hellaswag_prompt`), i.e. which strings are the context and the endings:

    llmc     raw `ctx` and raw endings: llm.c's `dev/data/hellaswag.py` (and build-nanogpt's)
    harness  lm-evaluation-harness's `hellaswag` task: "<activity_label>: <ctx_a> <Ctx_b>" and each
             ending, cleaned of WikiHow's bracketed artefacts (`harness_text`)

Three accuracies, each the fraction of examples whose chosen ending is the labelled one:

    acc             the largest sum of log-probabilities (unnormalised); the harness's `acc`
    acc_norm_token  the largest mean log-probability per ending token: llm.c's `acc_norm`
                    (gpt2 124M: acc 0.2859, acc_norm 0.2955 in llm.c's docstring, llmc prompt)
    acc_norm_char   the largest log-probability per character of the ending (without its leading
                    space): lm-evaluation-harness's `acc_norm` (`lls / len(choice)` in its
                    multiple-choice `process_results`). With the harness prompt, `acc` and
                    `acc_norm_char` are the harness's `acc` and `acc_norm` (tests/test_harness.py).

Ties go to the first ending, as `np.argmax` does. Nothing here needs jax: `nanogpt_jax.evaluate`
runs the rows (`nanogpt_jax.rows`) through the model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from nanogpt_jax import download, rows
from nanogpt_jax.errors import DataError
from nanogpt_jax.tokenizer import Tokenizer

MIRROR_PATH = "hellaswag/hellaswag_val.jsonl"
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_VAL = 10_042  # examples in the validation split
N_ENDINGS = 4
METRICS = ("acc", "acc_norm_token", "acc_norm_char")
PROMPTS = ("llmc", "harness")


def load(cache_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The validation examples as dicts (`ctx`, `endings`, `label`, ...), the first `limit` of them.

    The file is fetched once into cache_dir/hellaswag/ (from $NANOGPT_DATA_MIRROR when set).
    Raises DataError when it cannot be fetched or a line is not a HellaSwag example.
    """
    path = download.fetch(MIRROR_PATH, URL, Path(cache_dir) / MIRROR_PATH)
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(examples) >= limit:
                break
            try:
                ex = json.loads(line)
                ok = isinstance(ex["ctx"], str) and len(ex["endings"]) == N_ENDINGS and 0 <= int(ex["label"]) < 4
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(f"{path} line {i + 1} is not a HellaSwag example; delete the file to fetch it again")
            examples.append(ex)
    return examples


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One example as token rows: `rows[k]` is context + ending k (ints), of which the last
    `n_scored[k]` tokens are scored; `n_chars[k]` is the length of ending k in characters."""

    rows: tuple[tuple[int, ...], ...]
    n_scored: tuple[int, ...]
    n_chars: tuple[int, ...]
    label: int

    @property
    def length(self) -> int:
        """Input positions of the longest row (its tokens but the last)."""
        return max(len(r) for r in self.rows) - 1


def harness_text(example: dict) -> tuple[str, list[str]]:
    """(context, endings) as lm-evaluation-harness's `hellaswag` task builds them: the context is
    "<activity_label>: <ctx_a> <ctx_b capitalised>" (str.capitalize: first letter up, the rest down),
    and every string is cleaned: stripped, " [title]" -> ". ", other [bracketed] text removed, double
    spaces made single (WikiHow's markup). Written from the harness's `tasks/hellaswag/utils.py`."""
    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")

    context = clean(example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize())
    return context, [clean(e) for e in example["endings"]]


def render(tok: Tokenizer, example: dict, block_size: int, prompt: str = "llmc") -> Rendered:
    """Tokenize an example with one of PROMPTS: context, then each ending with a leading space. A row
    longer than block_size + 1 tokens keeps its end (`rows.continuation_row`: the context is cut from
    the left), so at most block_size ending tokens are scored. Raises DataError when the tokenizer
    cannot encode the text, ValueError for an unknown prompt."""
    if prompt == "llmc":
        context, endings = example["ctx"], list(example["endings"])
    elif prompt == "harness":
        context, endings = harness_text(example)
    else:
        raise ValueError(f"prompt={prompt!r}: choose from {PROMPTS}")
    try:
        ctx = tok.encode(context)
        ends = [tok.encode(" " + e) for e in endings]
    except DataError as e:
        raise DataError(f"HellaSwag's text cannot be encoded by this model's tokenizer ({e}); use a GPT-2 "
                        "model") from None
    cut = [rows.continuation_row(ctx, end, block_size) for end in ends]
    n_scored = tuple(n for _, n in cut)
    if min(n_scored) < 1:
        raise DataError(f"HellaSwag example {example.get('ind')} has an empty ending; the file is damaged")
    n_chars = tuple(max(len(e), 1) for e in endings)  # an empty ending would divide by 0
    return Rendered(tuple(r for r, _ in cut), n_scored, n_chars, int(example["label"]))


def correct(example: Rendered, loss_sums: np.ndarray) -> np.ndarray:
    """[acc, acc_norm_token, acc_norm_char] of one example as 0/1 floats, from the summed negative
    log-likelihood of each ending's scored tokens, (4,) nats."""
    nll = np.asarray(loss_sums, np.float64)
    picks = (np.argmin(nll), np.argmin(nll / np.array(example.n_scored)), np.argmin(nll / np.array(example.n_chars)))
    return np.array([float(p == example.label) for p in picks])
