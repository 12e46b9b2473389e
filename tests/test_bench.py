"""run_bench.py: every mode runs on a tiny model and writes the documented JSON; MFU, compare, errors.

Figures are never asserted against a speed: only their presence, their arithmetic and their files.
"""

import copy
import gzip
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, OutputReader, cli_env, one_error_line, run_cli, tiny_run_config

from nanogpt_jax import metrics
from nanogpt_jax.bench import report, runner
from nanogpt_jax.bench import train as train_bench
from nanogpt_jax.config import validate
from nanogpt_jax.errors import ConfigError, DataError


def bench_config(data_dir, tmp_path, **overrides):
    c = tiny_run_config(data_dir, tmp_path / "out", **{"bench.out": str(tmp_path / "bench" / "result.json"),
                                                       "bench.steps": 2, "bench.warmup": 1, **overrides})
    validate(c)
    return c


@pytest.fixture(scope="module")
def train_sweep(token_data, tmp_path_factory):
    """One train run over two batch sizes, with a given peak (MFU checkable by hand)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = bench_config(token_data, tmp, **{"bench.batch_sizes": (8, 16), "bench.peak_tflops": 2.0})
    return config, runner.run(config)


def test_train_sweep_writes_documented_json_markdown_and_chart(train_sweep, capsys):
    config, result = train_sweep
    out = config.bench.out
    loaded = report.load(out)  # checks the schema and every row's KEYS
    assert loaded["mode"] == "train" and [r["settings"]["batch_size"] for r in loaded["rows"]] == [8, 16]
    env = loaded["env"]
    for key in ("jax", "jaxlib", "flax", "optax", "python", "backend", "device_kind", "device_count", "cpu",
                "load_avg_1m"):
        assert key in env
    assert env["device_count"] == 8 and env["backend"] == "cpu"
    assert loaded["config"]["model"]["n_layer"] == 2 and loaded["config"]["bench"]["mode"] == "train"
    for row in loaded["rows"]:
        s, r = row["settings"], row["results"]
        # the data's vocabulary (meta.json of data.data_dir), as run_train.py would build the model
        assert (s["vocab_size"], s["block_size"], s["grad_accum"], s["data"]) == (64, 32, 1, "random")
        assert s["tokens_per_step"] == s["batch_size"] * 32 and s["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
        assert s["attention"] == "xla" and s["loss"] == "chunked: 1 x 32 positions"
        assert r["ms_p10"] <= r["ms_per_step"] <= r["ms_p90"] and len(r["step_times_ms"]) == 2
        assert r["tokens_per_s"] == pytest.approx(s["tokens_per_step"] / r["ms_per_step"] * 1e3)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
        # MFU from the figures in the file: flops_per_token x tokens/s / (8 devices x 2 TFLOP/s)
        assert r["peak_source"] == "given (bench.peak_tflops)" and r["flops_formula"] == metrics.FLOPS_FORMULA
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (8 * 2e12))
        assert r["compile_s"] > 0 and r["first_step_s"] > 0
        assert r["loss_first"] > 0 and r["loss_last"] > 0
        m = r["memory"]
        assert m["argument_bytes"] > 0 and m["temp_bytes"] >= 0 and m["output_bytes"] > 0
        assert m["device_peak_bytes"] is None  # the CPU backend does not report it
    stem = config.bench.out.rsplit(".", 1)[0]
    with open(stem + ".md") as f:
        table = f.read()
    assert table.startswith("| model | params | batch | block | accum | dtype | attention | loss | compile s |")
    assert "| 2x2x32 |" in table and "6N + 12·L·d·T" in table and "given (bench.peak_tflops)" in table
    with open(stem + ".png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_mfu_through_the_report_path_equals_hand_computation():
    # median of (0.3, 0.1, 0.2) s is 0.2 s: 1000 tokens / 0.2 s = 5000 tokens/s on 2 devices;
    # 1e6 FLOPs per token x 5000 / (2 x 1e10 FLOP/s) = 0.25
    peak = metrics.Peak(1e10, "test peak")
    r = report.train_figures([0.3, 0.1, 0.2], tokens_per_step=1000, n_devices=2, flops_per_token=1e6, peak=peak)
    assert (r["ms_per_step"], r["tokens_per_s"], r["tokens_per_s_per_device"], r["mfu"]) == pytest.approx(
        (200.0, 5000.0, 2500.0, 0.25))
    assert (r["ms_p10"], r["ms_p90"]) == pytest.approx((120.0, 280.0))
    row = {"settings": {"model": "m", "batch_size": 4}, "results": {**r, "memory": {}}}
    md = report.markdown(report.make_report("train", [row], {}))
    assert "| 25.0% |" in md and "test peak" in md


def test_unknown_device_gives_no_mfu(token_data, tmp_path, monkeypatch):
    # the bench takes its peak from metrics.device_peak (the one table, tested in test_metrics.py)
    unknown = metrics.peak_for_kind("Acme NPU 9000", "float32", "gpu")
    assert unknown.flops is None
    monkeypatch.setattr(train_bench.metrics, "device_peak", lambda device, dtype, override=None: unknown)
    result = runner.run(bench_config(token_data, tmp_path, **{"bench.steps": 1, "bench.warmup": 0}))
    r = result["rows"][0]["results"]
    assert r["mfu"] is None and r["peak_flops_per_device"] is None and "Acme NPU 9000" in r["peak_source"]
    assert r["tokens_per_s"] > 0
    assert "| unknown |" in report.markdown(result)
    assert report.load(tmp_path / "bench" / "result.json")["rows"][0]["results"]["mfu"] is None


def test_compare_prints_ratios(train_sweep, token_data, tmp_path, capsys):
    config, result = train_sweep
    slower = copy.deepcopy(result)
    for row in slower["rows"]:
        row["results"]["ms_per_step"] *= 2
        row["results"]["tokens_per_s"] /= 2
    text = report.compare(result, slower, "a.json", "b.json")
    rows = [line for line in text.splitlines() if line.startswith("| 2x2x32 B8 T32 float32 |")]
    assert any("| ms/step |" in line and line.endswith("| 2.00x |") for line in rows)
    assert any("| tokens/s |" in line and line.endswith("| 0.50x |") for line in rows)

    # through run_bench: bench.compare=<an earlier result.json> prints the ratios after the table
    capsys.readouterr()
    again = bench_config(token_data, tmp_path, **{"bench.batch_sizes": (8,), "bench.peak_tflops": 2.0,
                                                  "bench.compare": config.bench.out, "bench.steps": 1,
                                                  "bench.warmup": 0})
    runner.run(again)
    out = capsys.readouterr().out
    assert f"old: {config.bench.out}" in out and "| 2x2x32 B8 T32 float32 | tokens/s |" in out

    other = copy.deepcopy(result)
    for row in other["rows"]:
        row["settings"]["batch_size"] += 1
    other["rows"].append(other["rows"][0])
    with pytest.raises(DataError, match="no configuration"):
        report.compare(result, other)


def test_compare_file_problems_are_one_line_errors_before_running(token_data, tmp_path, train_sweep):
    config, _ = train_sweep
    with pytest.raises(DataError, match="no such file"):
        runner.run(bench_config(token_data, tmp_path, **{"bench.compare": str(tmp_path / "nope.json")}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        runner.run(bench_config(token_data, tmp_path, **{"bench.compare": str(tmp_path / "bad.json")}))
    with pytest.raises(DataError, match="is a train report"):
        runner.run(bench_config(token_data, tmp_path, **{"bench.mode": "data", "bench.compare": config.bench.out}))
    assert not (tmp_path / "bench").exists()  # nothing written


def test_generate_mode(token_data, tmp_path):
    config = bench_config(token_data, tmp_path, **{"bench.mode": "generate", "bench.batch_sizes": (2,),
                                                   "bench.steps": 1, "bench.warmup": 0,
                                                   "sample.max_new_tokens": 4})
    result = runner.run(config)
    report.check(report.load(config.bench.out))
    cases = [(r["settings"]["dtype"], r["settings"]["batch_size"], r["settings"]["kv_cache"]) for r in result["rows"]]
    assert cases == [("float32", 2, True), ("float32", 2, False), ("bfloat16", 2, True), ("bfloat16", 2, False)]
    for row in result["rows"]:
        s, r = row["settings"], row["results"]
        assert (s["prompt_len"], s["new_tokens"]) == (8, 4)  # block 32: prompt block/4, then 4 new
        assert (r["prefill_ms"] is not None) == s["kv_cache"]
        assert r["decode_tokens_per_s_all_rows"] == pytest.approx(2 * r["decode_tokens_per_s"])
        assert r["ms_per_token"] == pytest.approx(1e3 / r["decode_tokens_per_s"]) and r["compile_s"] > 0
    assert "| KV cache |" in report.markdown(result)
    assert {r["settings"]["weights"] for r in result["rows"]} == {"random (init_from=scratch)"}


def test_generate_mode_benchmarks_the_model_init_from_names(token_data, tmp_path, tiny_config, tiny_params):
    from nanogpt_jax import convert

    folder = tmp_path / "hf"  # tiny_config's 2 x 32 weights (vocab 97), not configs/tiny.py's shape
    convert.export_hf(tiny_config, tiny_params, folder)
    config = bench_config(token_data, tmp_path, **{"bench.mode": "generate", "bench.batch_sizes": (1,),
                                                   "bench.steps": 1, "bench.warmup": 0, "sample.max_new_tokens": 2,
                                                   "init_from": str(folder)})
    result = runner.run(config)
    for row in result["rows"]:
        s = row["settings"]
        assert (s["weights"], s["model"], s["vocab_size"], s["block_size"]) == (str(folder), "2x2x32", 97, 16)
    assert f"| {folder} |" in report.markdown(result)


@pytest.mark.parametrize("with_data", [True, False])
def test_data_mode(token_data, tmp_path, with_data):
    data_dir = token_data if with_data else tmp_path / "missing"
    config = bench_config(data_dir, tmp_path, **{"bench.mode": "data", "bench.batch_sizes": (8,),
                                                 "train.gradient_accumulation_steps": 2})
    result = runner.run(config)
    assert [(r["settings"]["grad_accum"], r["settings"]["batch_size"]) for r in result["rows"]] == [(1, 8), (2, 8)]
    for row in result["rows"]:
        s, r = row["settings"], row["results"]
        assert s["source"] == (str(token_data) if with_data else "random") and s["devices"] == 8
        assert r["host_ms_per_batch"] > 0 and r["batches_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batches_per_s"] * s["grad_accum"] * 8 * 32)
    report.load(config.bench.out)


def test_train_on_real_data(token_data, tmp_path):
    config = bench_config(token_data, tmp_path, **{"bench.data": True, "bench.steps": 1, "bench.warmup": 0})
    [row] = runner.run(config)["rows"]
    assert row["settings"]["data"] == str(token_data) and row["results"]["loss_last"] > 0


def test_profile_mode_writes_a_trace_and_names_the_ops(token_data, tmp_path):
    config = bench_config(token_data, tmp_path, **{"bench.mode": "profile", "bench.steps": 2, "bench.warmup": 0})
    [row] = runner.run(config)["rows"]
    r = row["results"]
    trace_dir = tmp_path / "out" / "profile"
    assert r["trace_dir"] == str(trace_dir)
    names = [os.path.basename(f) for f in r["trace_files"]]
    assert any(n.endswith(".xplane.pb") for n in names)  # TensorBoard's profile plugin reads these
    [perfetto] = [f for f in r["trace_files"] if f.endswith("perfetto_trace.json.gz")]
    with gzip.open(perfetto, "rt") as f:
        assert json.load(f)["traceEvents"]
    assert r["top_ops"] and any("dot_general" in op["op_name"] for op in r["top_ops"])
    assert sum(op["share"] for op in r["top_ops"]) <= 1.0 + 1e-9
    # every layer's copy of an op together, forward and backward told apart
    sources = [s["source"] for s in r["top_sources"]]
    assert any(s.startswith("backward GPT.hidden/h_*/") and s.endswith("dot_general") for s in sources)
    assert r["op_ms_per_step"] >= max(s["ms_per_step"] for s in r["top_sources"])
    md = report.markdown(report.load(config.bench.out))
    assert "| jax op (all layers) | ops | ms/step | share |" in md and "| op | jax op | ms/step | share |" in md


@pytest.mark.parametrize("key,value,message", [
    ("bench.mode", "serve", "bench.mode='serve'"),
    ("bench.batch_sizes", (4, 0), "bench.batch_sizes"),
    ("bench.peak_tflops", -1.0, "bench.peak_tflops"),
    ("bench.steps", 0, "bench.steps"),
])
def test_bad_settings_are_config_errors(token_data, tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        bench_config(token_data, tmp_path, **{key: value})


def test_batch_size_the_mesh_cannot_split(token_data, tmp_path):
    with pytest.raises(ConfigError, match="divisible by mesh.data"):
        runner.run(bench_config(token_data, tmp_path, **{"bench.batch_sizes": (4,)}))


def test_cli_prints_the_table_and_one_line_errors(token_data, tmp_path):
    args = ["--config", str(ROOT / "configs/tiny.py"), f"--config.data.data_dir={token_data}",
            "--config.bench.mode=data", "--config.bench.batch_sizes=(8,)"]
    done = run_cli("run_bench.py", *args, f"--config.bench.out={tmp_path / 'r.json'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| source | batch | block |" in done.stdout and (tmp_path / "r.md").is_file()
    done = run_cli("run_bench.py", *args, "--config.bench.mode=fly")
    assert one_error_line(done) == "error: bench.mode='fly': must be one of train, generate, data, profile"


# XLA's RESOURCE_EXHAUSTED as one line: tests/test_oom.py::test_bench (injected, any machine)

def test_ctrl_c_is_one_line(token_data, tmp_path):
    """Ctrl-C while steps are timed: `error: interrupted`, exit 1, and no crash while the interpreter shuts
    down under XLA's running computation (exit 139 in 2 of 6 tries before the CLI exited at once). The
    signal is sent once run_bench.py logs that its timed steps have begun, however long compiling took."""
    import signal

    # a test run started in the background (`make test &`, nohup) ignores SIGINT, and a child inherits an
    # ignored signal; a handled one is reset to the default at exec: handle it here while starting the child
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(tmp_path / "stdout", "w") as stdout:
            proc = subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), "--config",
                                     str(ROOT / "configs/tiny.py"), f"--config.data.data_dir={token_data}",
                                     "--config.bench.steps=1000000",
                                     f"--config.bench.out={tmp_path / 'r.json'}"],
                                    cwd=ROOT, env=cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, handler)
    try:
        stderr = OutputReader(proc.stderr)
        stderr.wait_for(r"train .*: compiled in [\d.]+ s; timing 1000000 steps", timeout=300)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        text = stderr.text(timeout=60)
    finally:
        proc.kill()  # never left running a million steps
        proc.wait(timeout=60)
    assert proc.returncode == 1 and text.strip().splitlines()[-1] == "error: interrupted", text[-3000:]
    assert "Fatal Python error" not in text and "Traceback" not in text
    assert [line for line in text.splitlines() if line.startswith("error: ")] == ["error: interrupted"], text[-3000:]
    assert (tmp_path / "stdout").read_text() == "" and not (tmp_path / "r.json").exists()
