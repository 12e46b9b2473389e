"""openwebtext, offline: tiny Hugging Face datasets built here stand in for the hub download."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.cli.prepare import run
from nanogpt.config import to_dataclass
from nanogpt.data.loader import open_split, read_meta
from nanogpt.data.prepare import openwebtext as owt
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import DataError

datasets = pytest.importorskip("datasets")  # an install without the extra  # noqa: F811
DOCS = [f"Document number {i}. " + "Some words about the weather and the sea. " * (i % 7) for i in range(230)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def saved(tmp_path) -> Path:
    datasets.Dataset.from_dict({"text": DOCS, "url": ["u"] * len(DOCS)}).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def prepare(compose_cfg, source, out, *overrides: str) -> dict:
    cfg = compose_cfg("prepare", ["data=openwebtext", f"data.hf_dataset={source}", f"data.data_dir={out}",
                                  "data.val_docs=10", "data.shard_docs=50", "data.num_proc=1", *overrides])
    return run(to_dataclass(cfg, "prepare_schema"))


def expected(docs: list[str], val_docs: int = 10) -> tuple[list[int], list[int]]:
    enc = get_tokenizer("gpt2")
    val_idx = set(owt.val_indices(len(docs), val_docs).tolist())
    split = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        split["val" if i in val_idx else "train"] += enc.encode(doc, special=False) + [50256]
    return split["train"], split["val"]


def test_save_to_disk_source(compose_cfg, saved, tmp_path):
    meta = prepare(compose_cfg, saved, tmp_path / "out")
    train, val = expected(DOCS)
    assert open_split(tmp_path / "out", "train").tolist() == train
    assert open_split(tmp_path / "out", "val").tolist() == val
    assert (meta["tokenizer"], meta["dtype"], meta["eot_token"]) == ("gpt2", "uint16", 50256)
    assert meta["source"] == f"hf:{saved}:train" and read_meta(tmp_path / "out") == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_worker_processes_give_the_same_bins(compose_cfg, saved, tmp_path):
    prepare(compose_cfg, saved, tmp_path / "one")
    prepare(compose_cfg, saved, tmp_path / "two", "data.num_proc=2")
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_local_data_files(compose_cfg, tmp_path, fmt):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    path = tmp_path / f"docs.{fmt}"
    ds.to_json(str(path)) if fmt == "jsonl" else ds.to_parquet(str(path))
    prepare(compose_cfg, path, tmp_path / "out")
    assert open_split(tmp_path / "out", "train").tolist() == expected(DOCS)[0]


def test_dataset_dict_folder_and_text_field(compose_cfg, tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS})})
    dd.save_to_disk(str(tmp_path / "dd"))
    prepare(compose_cfg, tmp_path / "dd", tmp_path / "out", "data.text_field=body")
    assert open_split(tmp_path / "out", "val").tolist() == expected(DOCS)[1]


def test_resume_after_interruption(compose_cfg, saved, tmp_path, monkeypatch):
    prepare(compose_cfg, saved, tmp_path / "clean")
    out = tmp_path / "out"
    real = owt.encode_docs
    calls = []

    def crash_in_third_shard(task):
        if isinstance(task, tuple) and task[0] >= 100:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) while shard 3 of 5 is half done
        return real(task)

    monkeypatch.setattr(owt, "encode_docs", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(compose_cfg, saved, out)
    assert not any((out / n).exists() for n in ("train.bin", "val.bin", "meta.json"))  # nothing final
    state = json.loads((out / owt.PROGRESS).read_text())
    assert state["shards_done"] == 2 and state["val_tokens"] > 0

    monkeypatch.setattr(owt, "encode_docs", lambda task: calls.append(task) or real(task))
    prepare(compose_cfg, saved, out)
    assert calls and all(isinstance(t, tuple) and t[0] >= 100 for t in calls)  # done shards not redone
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_changed_settings_start_over(compose_cfg, saved, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    real = owt.encode_docs
    monkeypatch.setattr(owt, "encode_docs", lambda t: (_ for _ in ()).throw(KeyboardInterrupt)
                        if isinstance(t, tuple) and t[0] >= 100 else real(t))
    with pytest.raises(KeyboardInterrupt):
        prepare(compose_cfg, saved, out)
    monkeypatch.setattr(owt, "encode_docs", real)
    prepare(compose_cfg, saved, out, "data.shard_docs=40")
    assert "starting over" in caplog.text
    assert open_split(out, "train").tolist() == expected(DOCS)[0]


def test_bad_sources(compose_cfg, saved, tmp_path):
    with pytest.raises(DataError, match="cannot load dataset .*check data.hf_dataset"):
        prepare(compose_cfg, tmp_path / "missing.jsonl", tmp_path / "o")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot load dataset .*broken.parquet"):
        prepare(compose_cfg, tmp_path / "broken.parquet", tmp_path / "o")
    with pytest.raises(DataError, match="no column 'content'.*data.text_field"):
        prepare(compose_cfg, saved, tmp_path / "o", "data.text_field=content")
    with pytest.raises(DataError, match="230 documents, not more than data.val_docs=500"):
        prepare(compose_cfg, saved, tmp_path / "o", "data.val_docs=500")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        prepare(compose_cfg, tmp_path / "empty.jsonl", tmp_path / "o")


def test_hub_offline_is_one_line(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset 'Skylion007/openwebtext'.*offline") as e:
        prepare(compose_cfg, "Skylion007/openwebtext", tmp_path / "o")
    assert "\n" not in str(e.value)


MEASURE = """
import json, sys, threading
from types import SimpleNamespace
import psutil
from nanogpt.data.benchmark import peak_rss_mb
from nanogpt.data.prepare import openwebtext

peak, done = {"main": 0, "workers": 0}, threading.Event()
def sample():  # anonymous memory (rss - file-backed pages) of this process and of its workers
    me = psutil.Process()
    while not done.wait(0.02):
        try:
            m = me.memory_info(); peak["main"] = max(peak["main"], m.rss - m.shared)
            for c in me.children():
                m = c.memory_info(); peak["workers"] = max(peak["workers"], m.rss - m.shared)
        except psutil.Error:
            pass
threading.Thread(target=sample, daemon=True).start()
openwebtext.prepare(SimpleNamespace(data_dir=sys.argv[2], hf_dataset=sys.argv[1], hf_split="train",
                                    text_field="text", val_docs=20, shard_docs=256, num_proc=2))
done.set()
print(json.dumps({**{k: v / 2**20 for k, v in peak.items()}, "peak_rss": peak_rss_mb()}))
"""


@pytest.mark.slow
def test_memory_stays_flat_as_input_grows(tmp_path):
    from nanogpt.data.benchmark import synthetic_text

    peaks = {}
    for mb in (1, 24):
        text = synthetic_text(mb, seed=mb)
        docs = [text[k: k + 4000] for k in range(0, len(text), 4000)]
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / f"ds{mb}"))
        del text, docs
        args = [sys.executable, "-c", MEASURE, str(tmp_path / f"ds{mb}"), str(tmp_path / f"o{mb}")]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
        peaks[mb] = json.loads(out.strip().splitlines()[-1])
        assert (tmp_path / f"o{mb}" / "train.bin").stat().st_size > mb * 300_000  # really tokenized
    # 23 MB more text is ~6M more tokens: ~12 MB as uint16, ~200 MB as Python lists, if it were held
    for key in ("main", "workers", "peak_rss"):
        assert peaks[24][key] - peaks[1][key] < 8, (key, peaks)
