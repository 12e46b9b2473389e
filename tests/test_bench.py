import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import compose

from nanogpt import bench
from nanogpt.bench.report import check_record, compare, load_records, save_records
from nanogpt.bench.train import _results
from nanogpt.cli.bench import main
from nanogpt.config import to_dataclass
from nanogpt.errors import ConfigError, DataError

TINY = ["model=tiny", "device=cpu", "warmup_steps=1", "steps=2"]


def bench_job(tmp_path, *overrides: str):
    return to_dataclass(compose("bench", [*TINY, f"out={tmp_path}", "name=t", *overrides]), "bench_schema")


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    job = bench_job(tmp_path_factory.mktemp("bench"), "batch_sizes=[2,4]", "dtypes=[float32,bfloat16]")
    return bench.run(job)


def test_train_sweep_times_the_real_step(train_records):
    assert [(r["settings"]["batch_size"], r["settings"]["dtype"]) for r in train_records] == [
        (2, "float32"), (2, "bfloat16"), (4, "float32"), (4, "bfloat16")]
    for r in train_records:
        check_record(r)
        s, res = r["settings"], r["results"]
        assert (s["model"], s["block_size"], s["compile"], s["tokens_per_step"]) == (
            "2x4x64", 64, False, s["batch_size"] * 64)
        assert res["tokens_per_s"] == pytest.approx(s["tokens_per_step"] / res["ms_per_iter"] * 1000)
        assert 0 < res["mfu"] < 1 and "probe" in res["peak_source"]
        assert res["compile_s"] is None and res["first_step_s"] > 0
        assert res["peak_memory_mb"] > 0 and res["memory_kind"].startswith("cpu_peak_rss")
        assert r["env"]["threads"] == torch.get_num_threads() and r["env"]["torch"] == torch.__version__


def test_mfu_from_known_times():
    trainer = SimpleNamespace(tokens_per_step=1000, device=torch.device("cpu"), dtype=torch.float32,
                              model=SimpleNamespace(flops_per_token=lambda: 1e6),
                              job=SimpleNamespace(system=SimpleNamespace(compile=True)))
    job = SimpleNamespace(peak_flops=1e10)
    r = _results(trainer, first=12.0, steady=[0.6, 0.4, 0.5], bench=job)
    # median 0.5 s for 1000 tokens: 2000 tokens/s x 1 MFLOP = 2 GFLOP/s of a 10 GFLOP/s peak
    assert (r["ms_per_iter"], r["tokens_per_s"], r["mfu"]) == pytest.approx((500, 2000, 0.2))
    assert (r["ms_per_iter_min"], r["ms_per_iter_max"], r["compile_s"]) == pytest.approx((400, 600, 12.0))
    assert r["peak_source"] == "given"


def test_json_schema_round_trip(train_records, tmp_path):
    path = save_records(train_records, tmp_path / "a.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "nanogpt-bench/1" and len(data["records"]) == 4
    record = data["records"][0]
    assert set(record) == {"schema", "mode", "time", "settings", "results", "env"}
    for key in ("device", "device_name", "cpu", "threads", "torch", "python"):
        assert key in record["env"]
    assert load_records(path) == train_records
    broken = copy.deepcopy(record)
    del broken["results"]["tokens_per_s"]
    with pytest.raises(DataError, match="tokens_per_s"):
        check_record(broken)


def test_compare_prints_ratios(train_records, tmp_path, monkeypatch, capsys):
    slower = copy.deepcopy(train_records)
    for r in slower:
        r["results"]["tokens_per_s"] /= 2
        r["results"]["ms_per_iter"] *= 2
    out = compare(train_records, slower, "a.json", "b.json")
    rows = [line for line in out.splitlines() if line.startswith("| 2x4x64")]
    assert len(rows) == 4 * 4  # four configurations x (ms/iter, tokens/s, MFU, peak MB)
    assert any("tokens/s" in row and row.endswith("0.50x |") for row in rows)
    assert any("ms/iter" in row and row.endswith("2.00x |") for row in rows)
    a, b = save_records(train_records, tmp_path / "a.json"), save_records(slower, tmp_path / "b.json")
    monkeypatch.setattr(sys, "argv", ["nanogpt-bench", "--compare", str(a), str(b)])
    main()
    assert "| 2x4x64 B2 T64 float32 | tokens/s |" in capsys.readouterr().out
    other = copy.deepcopy(train_records[:1])
    other[0]["settings"]["batch_size"] = 99
    with pytest.raises(DataError, match="matches"):
        compare(train_records, other)


def test_markdown_and_chart(train_records, tmp_path):
    paths = bench.write_outputs(train_records, tmp_path, "sweep")
    assert [p.name for p in paths] == ["sweep.json", "sweep.md", "sweep.png"]
    table = (tmp_path / "sweep.md").read_text()
    assert table.startswith("| model | params | batch | block | dtype | compile | ms/iter | min ms | tokens/s | MFU |")
    assert "| 2x4x64 | 0.14M | 4 | 64 | bfloat16 | no |" in table and "CPU matmul probe" in table
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_mode(tmp_path):
    records = bench.run(bench_job(tmp_path, "mode=generate", "batch_sizes=[2]", "generate.new_tokens=4"))
    assert [r["settings"]["cache"] for r in records] == [True, False]
    for r in records:
        check_record(r)
        res = r["results"]
        assert res["decode_tokens_per_s"] == pytest.approx(2 * 4 / res["generate_s"])
        assert res["prefill_tokens_per_s"] > 0 and r["settings"]["prompt_tokens"] == 16


def test_data_mode(tmp_path):
    records = bench.run(bench_job(tmp_path, "mode=data", "data.prepare_mb=0.05", "data.tokenizer=char",
                                  "data.loader_tokens=20000", "data.loader_iters=5", "data.samplers=[epoch]"))
    assert [r["settings"]["kind"] for r in records] == ["prepare", "loader"]
    for r in records:
        check_record(r)
        assert r["results"]["tokens_per_s"] > 0
    assert records[1]["settings"]["block_size"] == 64 and records[1]["results"]["batches_per_s"] > 0


def test_profile_mode_writes_a_chrome_trace(tmp_path):
    [record] = bench.run(bench_job(tmp_path, "mode=profile", "profile_steps=1"))
    check_record(record)
    [trace] = record["results"]["traces"]
    events = json.loads(open(trace).read())["traceEvents"]
    assert any(e.get("name") == "train_step" for e in events)  # the step is marked in the trace
    assert any(op["name"].startswith("aten::") for op in record["results"]["top_ops"])


def test_cli_writes_json_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nanogpt.cli.bench", *TINY, "steps=1", f"out={tmp_path}", "name=cli",
           "chart=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| 2x4x64 |" in proc.stdout and (tmp_path / "cli.md").is_file()
    assert load_records(tmp_path / "cli.json")[0]["settings"]["train_config"] == "train_shakespeare_char_cpu"


@pytest.mark.parametrize("override,message", [("dtypes=[float8]", "dtypes"), ("mode=serve", "mode"),
                                              ("steps=0", "steps"), ("compare=[a.json]", "compare")])
def test_bad_values_rejected(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        bench_job(tmp_path, override)
