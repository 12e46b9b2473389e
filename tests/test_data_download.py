import os

import pytest

from nanogpt.data.download import fetch
from nanogpt.errors import DataError

UNREACHABLE = "http://127.0.0.1:9/nothing-here.txt"  # connection refused at once: "offline"


def test_mirror_copy(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "hellaswag").mkdir(parents=True)
    (mirror / "hellaswag" / "hellaswag_val.jsonl").write_text('{"ind": 1}\n')
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(mirror))
    out = fetch("hellaswag/hellaswag_val.jsonl", UNREACHABLE, tmp_path / "dl" / "val.jsonl")
    assert out.read_text() == '{"ind": 1}\n'
    assert sorted(os.listdir(out.parent)) == ["val.jsonl"]  # no temporary file left


def test_shared_mirror_has_what_the_package_fetches():
    """conftest points the mirror at ../shared/data: the eval and HF-export files resolve through it."""
    from nanogpt.data.download import mirror_path

    for rel in ("tinyshakespeare/input.txt", "hellaswag/hellaswag_val.jsonl", "gpt2_bpe/encoder.json",
                "gpt2_bpe/vocab.bpe"):
        assert mirror_path(rel) is not None, rel


def test_download_when_not_in_mirror(tmp_path, monkeypatch):
    src = tmp_path / "remote.txt"
    src.write_bytes(b"payload" * 1000)
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(tmp_path / "empty-mirror"))
    out = fetch("x/remote.txt", src.as_uri(), tmp_path / "dest" / "remote.txt")  # file:// stands in for https
    assert out.read_bytes() == src.read_bytes()


def test_existing_file_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_DATA_MIRROR", raising=False)
    dest = tmp_path / "input.txt"
    dest.write_text("mine")
    assert fetch("tinyshakespeare/input.txt", UNREACHABLE, dest).read_text() == "mine"


def test_offline_without_mirror_copy_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(DataError, match=r"NANOGPT_DATA_MIRROR/gpt2_bpe/vocab\.bpe") as e:
        fetch("gpt2_bpe/vocab.bpe", UNREACHABLE, tmp_path / "out" / "vocab.bpe")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written
