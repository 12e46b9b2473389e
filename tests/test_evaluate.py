"""Exact evaluation: brute-force equality, device and host invariance, run_eval.py on a training run, bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, free_port, tiny_run_config

from nanogpt_jax import evaluate, scoring, sharding, step, tokenizer
from nanogpt_jax.errors import ConfigError, DataError
from nanogpt_jax.loss import token_losses
from nanogpt_jax.model import GPT
from nanogpt_jax.scoring import Scorer, perplexity


def random_tokens(n, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def window_starts(n_tokens, block, stride):
    """Written apart from batches.sliding_windows: starts 0, S, 2S, ... below the last one, which ends at the end."""
    last = max(0, n_tokens - 1 - block)
    return [s for s in range(0, last, stride)] + [last]


def brute_force(model, params, tokens, block, stride):
    """Each target t on its own, from tokens[s:t] where s is the first window start that reaches t (one
    forward pass over every such context, right-padded: causal attention never looks right)."""
    starts = window_starts(len(tokens), block, stride)
    rows, targets, last = np.zeros((len(tokens) - 1, block), np.int32), [], []
    for t in range(1, len(tokens)):
        s = min(st for st in starts if st + block >= t)
        rows[t - 1, :t - s] = tokens[s:t]
        targets.append(tokens[t])
        last.append(t - s - 1)
    logits = model.apply({"params": params}, jnp.asarray(rows))[np.arange(len(last)), np.array(last)]
    return float(token_losses(logits[:, None], jnp.asarray(targets)[:, None]).mean())


@pytest.fixture(scope="module")
def tiny(tiny_config, tiny_params):
    return GPT(tiny_config), tiny_params


def scorer_on(model, mesh):
    return Scorer(lambda p, x: model.apply({"params": p}, x), mesh)


@pytest.fixture(scope="module")
def scorer8(tiny):
    return scorer_on(tiny[0], sharding.make_mesh())


@pytest.mark.parametrize("n,stride", [(101, 16), (101, 5), (101, 1), (101, 7), (9, 3)])
def test_loss_equals_a_brute_force_per_token_computation(tiny, scorer8, n, stride):
    model, params = tiny
    tokens = random_tokens(n, seed=n + stride)
    r = perplexity(scorer8, params, tokens, block_size=16, stride=stride, batch_size=8)
    assert r["tokens"] == n - 1 and r["windows"] == len(window_starts(n, 16, stride))
    assert r["loss"] == pytest.approx(brute_force(model, params, tokens, 16, stride), abs=1e-5)
    assert r["ppl"] == pytest.approx(np.exp(r["loss"])) and r["bpb"] is None


def test_stride_one_gives_each_token_its_full_context(tiny, scorer8):
    """Stride 1: token t sees min(t, block_size) tokens, the most a block_size model can see."""
    model, params = tiny
    tokens = random_tokens(40, seed=3)
    rows = np.zeros((39, 16), np.int32)
    for t in range(1, 40):
        ctx = tokens[max(0, t - 16):t]
        rows[t - 1, :len(ctx)] = ctx
    last = np.minimum(np.arange(1, 40), 16) - 1
    logits = model.apply({"params": params}, jnp.asarray(rows))[np.arange(39), last]
    expected = float(token_losses(logits[:, None], jnp.asarray(tokens[1:, None].astype(np.int32))).mean())
    r = perplexity(scorer8, params, tokens, block_size=16, stride=1, batch_size=8)
    assert r["loss"] == pytest.approx(expected, abs=1e-5)


def test_the_same_loss_on_1_and_8_devices_and_on_an_fsdp_tensor_mesh(tiny):
    model, params = tiny
    tokens = random_tokens(203, seed=5)
    losses = []
    for mesh, batch_size in ((sharding.make_mesh(devices=jax.devices()[:1]), 3), (sharding.make_mesh(), 8),
                             (sharding.make_mesh(2, 2, 2), 4)):
        placed = jax.device_put(params, step.param_shardings(model, mesh))
        r = perplexity(scorer_on(model, mesh), placed, tokens, block_size=16, stride=6, batch_size=batch_size)
        assert r["tokens"] == 202
        losses.append(r["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_bytes_of_bpe_text_and_of_a_char_vocabulary():
    tok = tokenizer.gpt2()
    text = "Héllo wörld — naïve café.<|endoftext|>"
    ids = np.array(tok.encode(text) + [tok.eot_token])
    first = len(tok.decode(ids[:1]).encode())  # an ASCII first token: its text is its bytes
    assert evaluate.count_bytes(ids, evaluate.token_byte_lengths(tok)) == len(text.encode()) - first
    chars = tokenizer.CharTokenizer(["a", "é", "€"])
    assert evaluate.count_bytes(np.array([0, 1, 2, 2, 0]), evaluate.token_byte_lengths(chars)) == 2 + 3 + 3 + 1


def test_gather_sum_is_the_identity_in_one_process():
    v = np.array([1e9 + 0.123456789, 3.0])
    assert scoring.gather_sum(v) is v


# ---- run_eval.py on a training run ----------------------------------------------------------------


def run_eval_cli(*args, cwd=ROOT):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "run_eval.py"), "--config", str(ROOT / "configs/tiny.py"),
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(char_eval_run):
    return char_eval_run  # conftest: shared with tests/test_harness.py


def test_training_logs_the_figure_run_eval_reports_on_its_checkpoint(tiny_run, token_data, tmp_path):
    with open(tiny_run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/loss/val/loss")]
    assert [int(r["step"]) for r in rows] == [0, 10]
    report_path = tmp_path / "report" / "eval.json"
    r = run_eval_cli(f"--config.out_dir={tiny_run}", f"--config.data.data_dir={token_data}",
                     "--config.init_from=resume", f"--config.eval.out={report_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["model"]["step"] == 10 and report["devices"] == 8 and report["batch_size"] == 8
    task = report["tasks"]["loss/val"]
    assert task["tokens"] == 3999 and task["stride"] == task["block_size"] == 32
    assert report["metrics"]["eval/loss/val/loss"] == pytest.approx(float(rows[-1]["eval/loss/val/loss"]), abs=1e-6)
    # char ids 0..63 are chr(0x41 + id): id 63 is U+0080, two bytes in UTF-8
    val = np.fromfile(token_data / "val.bin", np.uint16)[1:]
    assert task["bytes"] == len(val) + int((val == 63).sum())
    assert task["bpb"] == pytest.approx(task["loss"] * task["tokens"] / np.log(2) / task["bytes"])
    md = (tmp_path / "report" / "eval.md").read_text()
    assert "| loss/val |" in md and f"{task['loss']:.4f}" in md and md in r.stdout


def test_bad_inputs_from_the_command_line_are_one_line_errors(tmp_path):
    for args, message in [
        (["--config.init_from=gpt2", "--config.eval.tasks=('loss','piqa')"], "unknown task 'piqa'"),
        (["--config.init_from=gpt2", "--config.eval.tasks=('text',)", f"--config.eval.text_path={tmp_path}/no.txt"],
         "no such file"),
    ]:
        r = run_eval_cli(*args, cwd=tmp_path)
        assert r.returncode == 1 and r.stdout == "", r.stderr[-2000:]
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def test_bad_inputs_in_process(tiny_run, token_data, tmp_path):
    def run(**overrides):
        c = tiny_run_config(token_data, tiny_run, **{"init_from": "resume", "eval.out": str(tmp_path / "e.json"),
                                                     "eval.cache_dir": str(tmp_path), **overrides})
        return evaluate.run(c)

    with pytest.raises(DataError, match=r"hellaswag needs .*GPT-2.* 64-token char vocabulary"):
        run(**{"eval.tasks": ("hellaswag",)})
    short = tmp_path / "short.txt"
    short.write_text("A")
    with pytest.raises(DataError, match=r"short.txt is 1 char token\(s\) long; at least 2"):
        run(**{"eval.tasks": ("text",), "eval.text_path": str(short)})
    with pytest.raises(ConfigError, match=r"eval.stride=33: must be <= the model's block_size=32"):
        run(**{"eval.stride": 33})
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run(init_from="scratch")
    with pytest.raises(DataError, match="does not exist; the checkpoint was trained on"):
        run(**{"data.data_dir": str(tmp_path / "elsewhere")})
    assert not (tmp_path / "e.json").exists()  # nothing written on a failure


def test_eval_and_sample_find_a_runs_data_by_one_rule(tiny_run, token_data, tmp_path, monkeypatch):
    """The checkpoint's recorded data folder unless data.data_dir is given (not the default); both tools agree."""
    import shutil

    from nanogpt_jax import data, restore

    monkeypatch.chdir(tmp_path)  # no data/openwebtext here: the default names nothing
    c = tiny_run_config(data.DEFAULT_DATA_DIR, tiny_run, init_from="resume", **{"eval.out": str(tmp_path / "e.json")})
    report = evaluate.run(c)  # the default data_dir: the run's own data (token_data) is found
    assert report["tasks"]["loss/val"]["data_dir"] == report["model"]["data_dir"] == str(token_data.resolve())
    assert restore.load_model(c)[3]["data_dir"] == str(token_data.resolve())
    copy = shutil.copytree(token_data, tmp_path / "copy")  # the same vocabulary in another folder, given explicitly
    c.data.data_dir = str(copy)
    assert evaluate.run(c)["tasks"]["loss/val"]["data_dir"] == str(copy) == restore.load_model(c)[3]["data_dir"]
    meta = json.loads((copy / "meta.json").read_text())
    meta["chars"] = meta["chars"][::-1]  # as many characters, other ids: the run's text would come out garbled
    (copy / "meta.json").write_text(json.dumps(meta))
    for fn in (evaluate.run, restore.load_model):
        with pytest.raises(DataError, match=rf"{copy}.* 64-token char vocabulary, but the checkpoint was trained on "
                                            rf"{token_data.resolve()}"):
            fn(c)


def test_an_hf_folder_without_data_is_told_to_pick_tasks_before_loading(hf_folder, tmp_path, monkeypatch):
    from nanogpt_jax import data, restore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(restore, "load_model", lambda *a, **k: pytest.fail("weights read before the data check"))
    c = tiny_run_config(data.DEFAULT_DATA_DIR, tmp_path, init_from=str(hf_folder[0]))
    with pytest.raises(DataError, match=r"data.data_dir='data/openwebtext', which does not exist; choose eval.tasks "
                                        r"that need no data folder \(text, wikitext2, hellaswag\)") as e:
        evaluate.run(c)
    assert "data_prep/openwebtext.py" not in str(e.value)


def test_text_task_scores_a_file_like_its_tokens(tiny_run, token_data, tmp_path):
    text = "".join(chr(0x41 + i) for i in np.random.default_rng(1).integers(0, 64, 300))
    (tmp_path / "story.txt").write_text(text)
    c = tiny_run_config(token_data, tiny_run, **{"init_from": "resume", "eval.tasks": ("text",), "eval.stride": 8,
                                                 "eval.text_path": str(tmp_path / "story.txt"),
                                                 "eval.out": str(tmp_path / "e.json")})
    report = evaluate.run(c)
    r = report["tasks"]["text/story"]
    assert r["tokens"] == 299 and r["stride"] == 8 and r["bytes"] == 299 + text[1:].count("\x80")
    assert set(report["metrics"]) == {"eval/text/story/loss", "eval/text/story/ppl", "eval/text/story/bpb"}


# ---- two processes on localhost ---------------------------------------------------------------------

# the loss and HellaSwag results of fixed tiny models on a mesh: run by each of two processes and by this one
EVAL_ON_MESH = """
import jax, numpy as np
from nanogpt_jax import hellaswag, step, tokenizer
from nanogpt_jax.scoring import Scorer, hellaswag_accuracy, perplexity
from nanogpt_jax.model import GPT, GPTConfig, init_params

def eval_on_mesh(mesh, cache_dir):
    def placed(model):
        params = init_params(model, jax.random.key(0))  # the same on every process
        return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: np.asarray(a)[i]),
                            params, step.param_shardings(model, mesh))

    def scorer(model):
        return Scorer(lambda p, x: model.apply({"params": p}, x), mesh)

    small = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32))
    tokens = np.random.default_rng(7).integers(0, 97, 301)
    loss = perplexity(scorer(small), placed(small), tokens, block_size=16, stride=7, batch_size=8)
    gpt2_vocab = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    examples = [hellaswag.render(tokenizer.gpt2(), ex, 16) for ex in hellaswag.load(cache_dir, limit=11)]
    hs = hellaswag_accuracy(scorer(gpt2_vocab), placed(gpt2_vocab), examples, batch_size=8, block_size=16)
    return {"loss": loss, "hellaswag": hs}
"""

MULTIHOST = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from nanogpt_jax import sharding
""" + EVAL_ON_MESH + """
print(json.dumps(eval_on_mesh(sharding.make_mesh(), sys.argv[3])), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(i), port, str(tmp_path / f"cache{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    namespace = {}
    exec(EVAL_ON_MESH, namespace)
    one = namespace["eval_on_mesh"](sharding.make_mesh(), tmp_path / "cache")
    for r in results:
        assert r["loss"]["tokens"] == one["loss"]["tokens"] == 300 and r["hellaswag"]["examples"] == 11
        assert r["loss"]["loss"] == pytest.approx(one["loss"]["loss"], rel=1e-6)
        assert {k: r["hellaswag"][k] for k in ("acc", "acc_norm_token", "acc_norm_char")} == \
            {k: one["hellaswag"][k] for k in ("acc", "acc_norm_token", "acc_norm_char")}



# ---- a Hugging Face GPT-2 folder (GPT-2's BPE) --------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return folder, hf.eval()  # no dropout


N_HELLASWAG = 12


def _hellaswag_by_transformers(hf, cache_dir, n: int, block_size: int) -> dict:
    """HellaSwag's three accuracies computed independently of our scorer: tiktoken's GPT-2 BPE, each row
    context + " " + ending cut from the left to block_size + 1 tokens, transformers' logits, the summed
    NLL of the ending's tokens, then the argmin by sum, by sum per token, by sum per character."""
    import tiktoken
    import torch

    enc = tiktoken.get_encoding("gpt2")
    hits = np.zeros(3)
    lines = (Path(cache_dir) / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()  # fetched by the run
    for ex in map(json.loads, lines[:n]):
        ctx = enc.encode(ex["ctx"])
        sums, n_tokens, n_chars = [], [], []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            row = (ctx + end)[-(block_size + 1):]
            scored = min(len(end), block_size)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([row[:-1]])).logits[0].double(), -1)
            targets = torch.tensor(row[1:])
            nll = -logp[torch.arange(len(targets)), targets][-scored:].sum().item()
            sums.append(nll), n_tokens.append(scored), n_chars.append(len(ending))
        sums = np.array(sums)
        picks = (np.argmin(sums), np.argmin(sums / n_tokens), np.argmin(sums / n_chars))
        hits += [p == int(ex["label"]) for p in picks]
    return dict(zip(("acc", "acc_norm_token", "acc_norm_char"), (h / n for h in hits), strict=True))


def test_an_hf_folder_on_text_and_hellaswag_match_transformers(hf_folder, tmp_path):
    """A random HF GPT-2 folder: the text task's loss equals transformers' own, and HellaSwag's three
    accuracies equal an independent computation with transformers' logits (no code of ours in it)."""
    import torch

    folder, hf = hf_folder
    text = "The quick brown fox jumps over the lazy dog, café and all."
    (tmp_path / "fox.txt").write_text(text)
    c = tiny_run_config(tmp_path / "no-data", tmp_path, **{
        "init_from": str(folder), "eval.tasks": ("text", "hellaswag"), "eval.text_path": str(tmp_path / "fox.txt"),
        "eval.max_examples": N_HELLASWAG, "eval.cache_dir": str(tmp_path / "cache"),
        "eval.out": str(tmp_path / "r.json")})
    report = evaluate.run(c)  # params placed on the 8-device mesh as they are read
    ids = tokenizer.gpt2().encode(text)
    assert len(ids) < 32  # one window: transformers' mean loss over ids[1:] is the oracle
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    r = report["tasks"]["text/fox"]
    assert r["tokens"] == len(ids) - 1 and r["loss"] == pytest.approx(expected, abs=1e-5)
    assert r["bytes"] == len(text.encode()) - len(tokenizer.gpt2().decode(ids[:1]).encode())
    hs = report["tasks"]["hellaswag"]
    assert hs["examples"] == N_HELLASWAG and set(report["metrics"]) >= {
        "eval/hellaswag/acc", "eval/hellaswag/acc_norm_token", "eval/hellaswag/acc_norm_char"}
    want = _hellaswag_by_transformers(hf, tmp_path / "cache", N_HELLASWAG, block_size=32)
    assert {m: hs[m] for m in want} == want, (hs, want)
    assert report["model"]["source"] == str(folder) and report["model"]["tokenizer"] == "gpt2"
    # the model that ran (the folder's 1 x 16 shape), not configs/tiny.py's 2 x 32, wherever the report says
    for shape in (report["model"]["config"], report["config"]["model"]):
        assert (shape["n_layer"], shape["n_embd"], shape["vocab_size"]) == (1, 16, 50257)


def test_wikitext2_and_hellaswag_are_capped_by_max_examples_and_show_progress(hf_folder, tmp_path, monkeypatch,
                                                                              caplog):
    import logging

    from nanogpt_jax import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)  # a line at every batch, so this short run shows them
    c = tiny_run_config(tmp_path / "no-data", tmp_path, **{
        "init_from": str(hf_folder[0]), "eval.tasks": ("wikitext2", "hellaswag"), "eval.max_examples": 3,
        "eval.cache_dir": str(tmp_path / "cache"), "eval.out": str(tmp_path / "r.json")})
    with caplog.at_level(logging.INFO):
        report = evaluate.run(c)
    wiki = report["tasks"]["wikitext2"]
    # 3 windows of 32 tokens every 16 (stride block_size // 2): the first scores 32 targets, the others 16 each
    assert (wiki["windows"], wiki["stride"], wiki["tokens"], wiki["max_windows"]) == (3, 16, 64, 3)
    assert report["tasks"]["hellaswag"]["examples"] == 3
    assert "wikitext2: 3/3 windows" in caplog.text and "hellaswag: 3/3 examples" in caplog.text
