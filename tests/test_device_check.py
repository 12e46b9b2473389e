"""device_check: the quick mode end to end on the CPU writes the documented report with every check
passed; bad input is one line (a check that raises, and GPU kinds: test_device_sections.py).

Figures are never asserted against a speed: only their presence and their files.
"""

import json

import pytest

from nanogpt_jax import device_check, device_sections


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One run without --quick: on a CPU the quick mode is chosen by itself."""
    out = tmp_path_factory.mktemp("device_check")
    status = device_check.main([f"--out={out}", "--batch_sizes=2"])
    return out, status, json.loads((out / "device_check.json").read_text())


def test_quick_mode_on_the_cpu_passes_every_check(quick_run):
    _, status, r = quick_run
    assert status == 0 and r["passed"] is True
    assert r["schema"] == device_check.SCHEMA and r["mode"] == "quick" and "no accelerator" in r["quick_reason"]
    checks = {(c["name"], c["dtype"]): c for c in r["checks"]}
    assert set(checks) == {("attention", "bfloat16"), ("attention", "float32"), ("chunked_loss", "float32"),
                           ("generation", "float32")}
    for c in checks.values():
        assert c["passed"] is True and c["status"] == "ok" and c["seconds"] > 0, c
    for dtype in ("bfloat16", "float32"):  # auto is xla on a CPU: one program on both sides, and the report says so
        a = checks["attention", dtype]
        assert a["impl"] == "xla" and a["rel_error"] == 0 and "same implementation" in a["note"]
    loss = checks["chunked_loss", "float32"]
    assert 0 <= loss["rel_error"] <= loss["tolerance"] == device_sections.TOLERANCE["float32"]
    assert set(loss["parts"]) == {"loss", "gradients"} and "last padded" in loss["compared"]
    assert checks["generation", "float32"]["note"] == "identical tokens"


def test_quick_mode_reports_environment_speed_and_skipped_sections(quick_run):
    _, _, r = quick_run
    assert set(r) == {"schema", "time", "mode", "quick_reason", "seconds", "passed", "env", "gpu_target_config",
                      "checks", "train", "generate", "side_by_side"}
    env = r["env"]
    assert env["status"] == "ok" and env["platform"] == "cpu" and env["device_count"] == 8
    assert env["jax"] and env["flax"] and env["packages"]["orbax-checkpoint"] and env["bytes_limit"] is None
    assert r["gpu_target_config"]["status"] == "skipped" and "not a GPU" in r["gpu_target_config"]["reason"]
    train = r["train"]
    assert train["status"] == "ok" and [row["batch_per_device"] for row in train["rows"]] == [2]
    for row in train["rows"]:
        res = row["results"]
        assert row["status"] == "ok" and row["settings"]["batch_size"] == 8 * row["batch_per_device"]
        assert res["tokens_per_s"] > 0 and res["ms_per_step"] > 0 and res["mfu"] > 0
        assert res["compiled_bytes"] > 0 and res["memory"]["device_peak_bytes"] is None  # the CPU reports no peak
    assert train["aot"]["status"] == "skipped" and "not a GPU" in train["aot"]["reason"]
    gen = r["generate"]
    assert gen["status"] == "ok" and [g["batch_size"] for g in gen["rows"]] == [1, 8]
    assert all(g["tokens_per_s"] > 0 and g["tokens_per_s_all_rows"] >= g["tokens_per_s"] for g in gen["rows"])
    assert r["side_by_side"] == {"status": "skipped", "reason": "--nanogpt not given"}


def test_quick_mode_writes_the_markdown_tables(quick_run, capsys):
    out, _, _ = quick_run
    md = (out / "device_check.md").read_text()
    assert md.startswith("# Device check: 8 x cpu, quick mode")
    for line in ("## Correctness: all 4 passed", "| check | dtype | compared | max abs error | relative error |",
                 "| attention | bfloat16 | xla vs xla", "## Train step", "| batch/device | attention | loss |",
                 "## Generation", "| model | batch | dtype |", "## Side by side with nanoGPT",
                 "skipped: --nanogpt not given", "| XLA target description | skipped: not a GPU"):
        assert line in md, line


@pytest.mark.parametrize("args, message", [
    (["--nanogpt={tmp}"], "is not a karpathy/nanoGPT checkout (no bench.py, model.py, train.py)"),
    (["--batch_sizes=8,x"], "give sequences per device as positive integers"),
    ([], "the following arguments are required: --out"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    argv = [a.format(tmp=tmp_path) for a in args] + ([f"--out={out}"] if args else [])
    with pytest.raises(SystemExit) as e:
        device_check.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_markdown_of_an_accelerator_report(quick_run):
    """The GPU-only parts of the tables (a written target description, the AOT figure, a train row that
    ran out of memory, the side by side), from the CPU report with those sections filled in by hand."""
    _, _, r = quick_run
    row = r["train"]["rows"][0]
    aot = {"status": "ok", "topology": "gpu-1", "gpu_target_config": "dc/gpu_target_config.txtpb",
           "batch_per_device": 2, "compiled_bytes": 3 * 2**30, "compile_s": 21.0, "error": None}
    out_of_memory = {"batch_per_device": 64, "status": "failed", "reason": "JaxRuntimeError: RESOURCE_EXHAUSTED"}
    side = {"status": "ok", "shape": "gpt2 124M, batch 16, block 1024", "dtype": "bfloat16", "nanogpt_compile": True,
            "peak_source": "H100 SXM datasheet, bfloat16 dense", "command": "...",
            "nanogpt": {"ms_per_step": 200.0, "tokens_per_s": 81920.0, "mfu": 0.5},
            "ours": {"ms_per_step": 160.0, "tokens_per_s": 102400.0, "mfu": None}}
    r = {**r, "gpu_target_config": {"status": "ok", "path": "dc/gpu_target_config.txtpb", "device_kind": "H100"},
         "train": {**r["train"], "aot": aot, "rows": [{**row, "aot": aot}, out_of_memory]}, "side_by_side": side}
    md = device_check.markdown(r)
    assert "| XLA target description | `dc/gpu_target_config.txtpb` (`--gpu_target_config=`" in md
    assert "| 3,072.0 | - |" in md and "AOT: the step compiled for `gpu-1` without the device (21.0 s)" in md
    assert "| 64 | - | - | - | - | - | - | - | - | - | JaxRuntimeError: RESOURCE_EXHAUSTED |" in md
    train_table = md.split("## Train step")[1].split("##")[0]
    assert "| 2 | xla | chunked: 1 x 64 positions |" in train_table and "unknown" not in train_table
    assert "| figure | nanoGPT (torch.compile) | nanogpt_jax | ours / theirs |" in md
    assert "| tokens/s | 81,920 | 102,400 | 1.25x |" in md and "| MFU | 50.0% | unknown | |" in md
