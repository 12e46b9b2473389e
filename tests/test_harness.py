"""lm-evaluation-harness as the judge: its own hellaswag preprocessing over a local JSONL, through model
nanogpt_jax, scores what our hellaswag task scores; rolling and generation equal our text task and sampler."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_run_config

from nanogpt_jax import evaluate, harness, hellaswag, sample, scoring, step, tokenizer
from nanogpt_jax.errors import ConfigError, DataError, UserError
from nanogpt_jax.model import init_params
from nanogpt_jax.train import train

N_EXAMPLES = 200  # the first examples of HellaSwag's validation file


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A harness task over a local JSONL: the harness's own hellaswag task (its process_docs, prompt,
    choices and metrics), read with `dataset_path: json` from the first N_EXAMPLES examples."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    examples = hellaswag.load(folder / "cache", limit=N_EXAMPLES)
    (folder / "hellaswag_head.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    (folder / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (folder / "hellaswag_local.yaml").write_text(f"""task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder / 'hellaswag_head.jsonl'}
  cache_dir: {folder / 'hf_cache'}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder, examples


@pytest.fixture(scope="session")
def manager(task_dir):
    """The harness's task index: its own ~15,000 tasks and ours (built once, as run_eval.py builds it)."""
    return harness.task_manager(str(task_dir[0]))


def write_gpt2_data(folder, texts):
    """A prepared GPT-2-token dataset (train.bin, val.bin, meta.json) of `texts`, <|endoftext|> between them."""
    tok = tokenizer.gpt2()
    ids = np.array([t for text in texts for t in tok.encode(text) + [tok.eot_token]], np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    cut = len(ids) * 9 // 10
    splits = {}
    for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
        part.tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": len(part), "max_id": int(part.max())}
    (folder / "meta.json").write_text(json.dumps({**tok.meta(), "format": "nanogpt_jax/1", "splits": splits}))
    return folder


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory, task_dir):
    """A small trained GPT-2-vocabulary checkpoint: 15 steps on HellaSwag contexts (examples after the scored ones)."""
    texts = [ex["ctx"] + " " + ex["endings"][ex["label"]] for ex in hellaswag.load(task_dir[0] / "cache", limit=1200)]
    data_dir = write_gpt2_data(tmp_path_factory.mktemp("gpt2_data"), texts[N_EXAMPLES:])
    out = tmp_path_factory.mktemp("gpt2_run")
    # block 16: most rows are cut from the left (cheap, and the cut is part of what is compared)
    train(tiny_run_config(data_dir, out, **{"model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16,
                                           "train.max_iters": 15, "train.eval_interval": 15}))
    return out, data_dir


@pytest.fixture(scope="session")
def char_run(char_eval_run, token_data):
    """A small trained char-vocabulary checkpoint (conftest: configs/tiny.py, 10 steps), its data folder."""
    return char_eval_run, token_data


@pytest.fixture(scope="session")
def trained_lm(gpt2_run):
    return harness.NanoGPTLM.load(out_dir=str(gpt2_run[0]), checkpoint="best", batch_size=32)


def random_like(lm):
    """The same model with fresh random weights, sharing `lm`'s scorer (and so its compilations)."""
    params = jax.device_put(init_params(lm.model, jax.random.key(0)), step.param_shardings(lm.model, lm.mesh))
    return harness.NanoGPTLM(lm.model, params, lm.tok, lm.mesh, batch_size=lm.batch_size, scorer=lm.scorer)


def test_the_harness_prompt_is_the_harness_hellaswag_preprocessing(task_dir):
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    docs = process_docs(datasets.Dataset.from_list(task_dir[1]))
    for ex, doc in zip(task_dir[1], docs, strict=True):
        assert hellaswag.harness_text(ex) == (doc["query"], doc["choices"])


def hellaswag_ours(lm, examples):
    rendered = [hellaswag.render(lm.tok, ex, lm.block_size, "harness") for ex in examples]
    return scoring.hellaswag_accuracy(lm.scorer, lm.params, rendered, batch_size=lm.batch_size // 4,
                                       block_size=lm.block_size)


@pytest.mark.slow
def test_harness_acc_and_acc_norm_equal_our_hellaswag_on_a_random_and_a_trained_model(task_dir, manager, trained_lm):
    trained = trained_lm
    assert trained.model.config.vocab_size == 50304 and trained.block_size == 16
    for lm in (random_like(trained), trained):
        theirs = harness.evaluate_tasks(lm, ["hellaswag_local"], manager)["lm_eval/hellaswag_local"]
        ours = hellaswag_ours(lm, task_dir[1])
        assert theirs["n_samples"] == ours["examples"] == N_EXAMPLES
        assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm_char"], (theirs, ours)
    assert ours["acc"] != 0.25  # the trained model is not at chance on every metric: the test can tell


def test_loglikelihood_equals_a_direct_forward_of_each_row(trained_lm, task_dir):
    """The test above compares two consumers of one scorer; this pins the scorer itself: the log-likelihood
    (and greedy flag) the harness gets for HellaSwag requests equals a plain full forward of each row
    (context + continuation cut from the left to block_size + 1 tokens), log-softmax in float64."""
    from lm_eval.api.instance import Instance

    from nanogpt_jax.model import GPT

    lm = trained_lm
    pairs = []
    for ex in task_dir[1][:3]:
        context, endings = hellaswag.harness_text(ex)
        pairs += [(context, " " + e) for e in endings]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    params, B = jax.device_get(lm.params), lm.block_size
    for (context, continuation), (loglik, greedy) in zip(pairs, got, strict=True):
        ctx = lm.tok.encode(context)
        cont = lm.tok.encode(context + continuation)[len(ctx):]  # the harness's split of the pair
        row = (ctx + cont)[-(B + 1):]
        logits = np.asarray(lm.model.apply({"params": params}, np.array([row[:-1]]), method=GPT.predict), np.float64)
        logp = logits[0] - logits[0].max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        n = min(len(cont), B)
        targets = np.array(row[1:])[-n:]
        assert loglik == pytest.approx(logp[-n:][np.arange(n), targets].sum(), rel=1e-5, abs=1e-4)
        assert greedy == bool((logp[-n:].argmax(-1) == targets).all())


@pytest.mark.slow
def test_run_eval_reports_harness_tasks_beside_ours(task_dir, manager, gpt2_run, tmp_path):
    run, data_dir = gpt2_run
    c = tiny_run_config(data_dir, run, **{
        "init_from": "resume", "eval.tasks": ("hellaswag", "lm_eval:hellaswag_local"),
        "eval.hellaswag_prompt": "harness", "eval.max_examples": 20, "eval.lm_eval_include_path": str(task_dir[0]),
        "eval.cache_dir": str(task_dir[0] / "cache"), "eval.out": str(tmp_path / "eval.json")})
    report = evaluate.run(c)
    ours, theirs = report["tasks"]["hellaswag"], report["tasks"]["lm_eval/hellaswag_local"]
    assert ours["examples"] == theirs["n_samples"] == 20 and ours["prompt"] == "harness"
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm_char"])
    import lm_eval

    assert report["lm_eval"]["version"] == theirs["lm_eval_version"] == lm_eval.__version__
    assert report["metrics"]["eval/lm_eval/hellaswag_local/acc_norm"] == theirs["acc_norm"]
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["lm_eval/hellaswag_local"] == theirs
    md = (tmp_path / "eval.md").read_text()
    assert f"lm-evaluation-harness {lm_eval.__version__}" in md and "| hellaswag |" in md
    assert f"| hellaswag_local | 1.0 | 0 | 20 | acc_norm | {theirs['acc_norm']:.4f} |" in md


def test_rolling_loglikelihood_is_our_text_tasks_summed_loss(char_run, tmp_path):
    from lm_eval.api.instance import Instance

    run, data_dir = char_run
    text = "".join(chr(0x41 + i) for i in np.random.default_rng(3).integers(0, 64, 150))  # 150 chars, block 32
    (tmp_path / "story.txt").write_text(text)
    c = tiny_run_config(data_dir, run, **{"init_from": "resume", "eval.tasks": ("text",), "eval.stride": 8,
                                         "eval.text_path": str(tmp_path / "story.txt"),
                                         "eval.out": str(tmp_path / "e.json")})
    r = evaluate.run(c)["tasks"]["text/story"]
    lm = harness.NanoGPTLM.load(out_dir=str(run), stride=8, batch_size=4)
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (text, "AB", "A")]
    summed, two, one = lm.loglikelihood_rolling(requests)
    assert summed == pytest.approx(-r["loss"] * r["tokens"], rel=1e-4)  # a char vocabulary: no prefix token
    assert two < 0 and one == 0.0  # one character is context only: nothing scored


@pytest.fixture(scope="session")
def greedy_text(char_run):
    """run_sample.py's greedy continuation of "ABCD" (40 characters), in-process."""
    run, data_dir = char_run
    c = tiny_run_config(data_dir, run, **{"init_from": "resume", "sample.temperature": 0.0, "sample.prompt": "ABCD",
                                         "sample.max_new_tokens": 40})
    return sample.sample(c, out=io.StringIO())[0]


def test_generate_until_is_run_sample_greedy_cut_at_the_until_string(char_run, greedy_text):
    from lm_eval.api.instance import Instance

    full = greedy_text
    lm = harness.NanoGPTLM.load(out_dir=str(char_run[0]), batch_size=8)
    until = full[12:14]
    requests = [Instance("generate_until", {}, ("ABCD", {"until": [], "max_gen_toks": 40}), 0),
                Instance("generate_until", {}, ("ABCD", {"until": [until], "max_gen_toks": 40}), 1)]
    assert lm.generate_until(requests) == [full, full[:full.index(until)]] and len(full) == 40


def test_loglikelihood_is_greedy_for_the_greedy_text_and_cuts_long_contexts(char_run, greedy_text):
    from lm_eval.api.instance import Instance

    lm = harness.NanoGPTLM.load(out_dir=str(char_run[0]), batch_size=4)
    greedy = greedy_text[:3]
    other = "Z" if greedy[0] != "Z" else "Y"
    ctx_long = "".join(chr(0x41 + i % 64) for i in range(100))  # longer than block_size 32: cut from the left
    out = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0) for ctx, cont in
                            (("ABCD", greedy), ("ABCD", greedy[:1]), ("ABCD", other),
                             (ctx_long, "AB"), (ctx_long[-31:], "AB"))])
    assert out[0][1] and out[1][1] and not out[2][1]
    assert out[0][0] < out[1][0] < 0
    assert out[3][0] == pytest.approx(out[4][0], abs=1e-5)  # 32 positions: the same last 31 context tokens


def test_bad_input_is_one_line(char_run, task_dir, manager, tmp_path):
    run, data_dir = char_run
    with pytest.raises(ConfigError, match=r"unknown lm_eval task 'hellaswagg' \(did you mean hellaswag"):
        harness.check_tasks(["arc_easy", "hellaswagg"], manager)
    c = tiny_run_config(data_dir, run, **{"init_from": "resume", "eval.tasks": ("lm_eval:no_such_task",),
                                         "eval.lm_eval_include_path": str(task_dir[0]),
                                         "eval.out": str(tmp_path / "e.json")})
    with pytest.raises(ConfigError, match="unknown lm_eval task 'no_such_task'"):
        evaluate.run(c)
    with pytest.raises(ConfigError, match="names no task"):
        harness.task_names(["lm_eval:"])
    with pytest.raises(ConfigError, match="run by run_eval.py only"):
        evaluate.check_config(tiny_run_config(data_dir, run, **{"train.eval_tasks": ("lm_eval:piqa",)}))
    # a checkpoint whose tokenizer cannot be found: its data folder (meta.json) given as an empty one
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no prepared data \(train.bin, val.bin, meta.json\)"):
        harness.NanoGPTLM.load(out_dir=str(run), data_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"no latest checkpoint in .*/none/checkpoints; .* out_dir= in --model_args"):
        harness.NanoGPTLM.load(out_dir=str(tmp_path / "none"))  # in this command's terms, not run_sample.py's
    with pytest.raises(UserError, match="give out_dir=DIR .* or init_from"):
        harness.NanoGPTLM.load()
    with pytest.raises(UserError, match="model_args: unknown key 'checkpoints'"):
        harness.NanoGPTLM.load(out_dir=str(run), checkpoints="best")
    assert not (tmp_path / "e.json").exists()


def test_without_the_extra_an_lm_eval_task_is_one_line_naming_it(tmp_path):
    """lm_eval made unimportable (as when the extra is not installed): run_eval.py says which extra to install."""
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['run_eval.py', '--config', "
            f"'{ROOT / 'configs/tiny.py'}', '--config.init_from=gpt2', \"--config.eval.tasks=('lm_eval:piqa',)\"]; "
            f"runpy.run_path('{ROOT / 'run_eval.py'}', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "pip install -e '.[eval]'" in r.stderr, r.stderr


@pytest.mark.slow
def test_the_shell_command_runs_a_checkpoint_through_lm_evals_own_command_line(task_dir, gpt2_run, trained_lm,
                                                                               tmp_path):
    run, _ = gpt2_run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device
    r = subprocess.run([sys.executable, "-m", "nanogpt_jax.harness", "--model", "nanogpt_jax", "--model_args",
                        f"out_dir={run},checkpoint=best", "--tasks", "hellaswag_local", "--include_path",
                        str(task_dir[0]), "--limit", "3", "--batch_size", "auto", "--output_path", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (results,) = tmp_path.glob("*/results_*.json")
    report = json.loads(results.read_text())
    assert report["model_name"] == str(run) and results.parent.name == str(run).replace("/", "__")  # the run's name
    theirs = report["results"]["hellaswag_local"]
    ours = hellaswag_ours(trained_lm, task_dir[1][:3])
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm_char"])
    assert "|hellaswag_local|" in r.stdout.replace(" ", "")


@pytest.mark.slow
def test_the_shell_command_keeps_lm_evals_own_models_and_says_an_unknown_task_in_one_line(task_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    common = [sys.executable, "-m", "nanogpt_jax.harness", "--model", "dummy", "--include_path", str(task_dir[0]),
              "--limit", "2", "--output_path", str(tmp_path)]
    r = subprocess.run([*common, "--tasks", "hellaswag_local"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "|hellaswag_local|" in r.stdout.replace(" ", ""), r.stderr[-3000:]
    r = subprocess.run([*common, "--tasks", "hellaswag_locall"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: unknown lm_eval task 'hellaswag_locall' (did you mean hellaswag_local"), r.stderr[-3000:]
    assert "--include_path DIR" in r.stderr
