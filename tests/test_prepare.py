import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt.cli.prepare import run
from nanogpt.config import CONFIG_DIR, PrepareJob, to_dataclass
from nanogpt.data.loader import open_split, read_meta
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def job(compose_cfg, *overrides: str) -> PrepareJob:
    return to_dataclass(compose_cfg("prepare", list(overrides)), "prepare_schema")


def prepare(compose_cfg, *overrides: str) -> dict:
    return run(job(compose_cfg, *overrides))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")))
def test_every_data_yaml_composes_for_prepare(compose_cfg, name):
    j = job(compose_cfg, f"data={name}")
    assert j.data.name == name and j.data.data_dir == f"data/{name}"


def test_prepare_defaults(compose_cfg):
    d = job(compose_cfg).data
    assert (d.name, d.tokenizer, d.val_fraction, d.num_proc) == ("shakespeare_char", "", 0.1, 0)
    assert job(compose_cfg, "data=openwebtext").data.hf_dataset == "Skylion007/openwebtext"


def test_text_input_string_or_list(compose_cfg):
    assert job(compose_cfg, "data=text", "data.input=my/folder/*.txt").data.input == "my/folder/*.txt"
    assert job(compose_cfg, "data=text", "data.input=[a.txt,docs/]").data.input == ["a.txt", "docs/"]


@pytest.mark.parametrize("override,message", [
    ("data.tokenizer=bpe", "data.tokenizer"),
    ("data.val_fraction=1.0", "val_fraction"),
    ("data.num_proc=-1", "num_proc"),
    ("data.val_docs=0", "val_docs"),
])
def test_bad_prepare_values(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        job(compose_cfg, "data=text", override)


def test_fixed_tokenizer_datasets_refuse_another(compose_cfg):
    with pytest.raises(ConfigError, match="data=text"):
        job(compose_cfg, "data=shakespeare", "data.tokenizer=char")


def test_unknown_dataset_name(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data=text for your own files"):
        prepare(compose_cfg, "data.name=wikipedia", f"data.data_dir={tmp_path}")


# ---- Shakespeare, through the mirror ------------------------------------------------------------


def nanogpt_split(text: str) -> tuple[str, str]:
    n = len(text)
    return text[: int(n * 0.9)], text[int(n * 0.9):]


def test_shakespeare_char_exact(compose_cfg, tmp_path):
    meta = prepare(compose_cfg, "data=shakespeare_char", f"data.data_dir={tmp_path}")
    assert meta["vocab_size"] == 65 and meta["tokenizer"] == "char" and meta["eot_token"] is None
    assert {s: v["tokens"] for s, v in meta["splits"].items()} == {"train": 1_003_854, "val": 111_540}
    text = (tmp_path / "input.txt").read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    train, val = nanogpt_split(text)
    assert meta["chars"] == chars
    np.testing.assert_array_equal(open_split(tmp_path, "val"), [stoi[c] for c in val])
    assert get_tokenizer("char", meta["chars"]).decode(open_split(tmp_path, "train")[:12]) == train[:12]
    assert leftovers(tmp_path) == []


def test_shakespeare_gpt2_exact(compose_cfg, tmp_path):
    meta = prepare(compose_cfg, "data=shakespeare", f"data.data_dir={tmp_path}")
    assert {s: v["tokens"] for s, v in meta["splits"].items()} == {"train": 301_966, "val": 36_059}
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eot_token"]) == ("gpt2", 50257,
                                                                                          "uint16", 50256)
    enc = get_tokenizer("gpt2")
    train, val = nanogpt_split((tmp_path / "input.txt").read_text())
    np.testing.assert_array_equal(open_split(tmp_path, "train"), enc.encode(train, special=False))
    np.testing.assert_array_equal(open_split(tmp_path, "val"), enc.encode(val, special=False))
    import hashlib

    assert meta["splits"]["val"]["sha256"] == hashlib.sha256((tmp_path / "val.bin").read_bytes()).hexdigest()
    assert read_meta(tmp_path) == meta


# ---- text: the user's own files ----------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document. It has words in it.\n" * 30)
    (folder / "sub" / "b.md").write_text("Second file, in a sub folder!\n" * 30)
    (folder / ".hidden").write_text("never read")
    (folder / "empty.txt").write_text("")  # no tokens, and no extra separator
    return folder


def test_text_folder_gpt2(compose_cfg, corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare(compose_cfg, "data=text", f"data.input={corpus}", f"data.data_dir={out}")
    enc = get_tokenizer("gpt2")
    a, b = (corpus / "a.txt").read_text(), (corpus / "sub" / "b.md").read_text()
    tokens = np.r_[open_split(out, "train"), open_split(out, "val")]
    assert tokens.tolist() == enc.encode(a, special=False) + [50256] + enc.encode(b, special=False)
    assert meta["source"] == f"text:{corpus}" and leftovers(out) == []


def test_text_glob_list_and_char(compose_cfg, corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare(compose_cfg, "data=text", f"data.input=[{corpus}/*.txt,{corpus}/sub/b.md]",
                   "data.tokenizer=char", "data.val_fraction=0.25", f"data.data_dir={out}")
    text = (corpus / "a.txt").read_text() + (corpus / "sub" / "b.md").read_text()
    assert meta["chars"] == sorted(set(text)) and meta["vocab_size"] == len(set(text))
    assert meta["splits"]["val"]["tokens"] == len(text) - int(len(text) * 0.75)
    tok = get_tokenizer("char", meta["chars"])
    assert tok.decode(np.r_[open_split(out, "train"), open_split(out, "val")]) == text


def test_text_large_file_is_cut_only_where_tokens_do_not_change(tmp_path, monkeypatch):
    """Pieces are encoded separately; the cut points must not change GPT-2 tokens."""
    import nanogpt.data.prepare.text as text_mod

    monkeypatch.setattr(text_mod, "PIECE_CHARS", 300)
    monkeypatch.setattr(text_mod, "BLOCK_CHARS", 1000)
    src = tmp_path / "wiki.txt"
    wiki = Path(os.environ["NANOGPT_DATA_MIRROR"], "wikitext-2", "wiki.test.raw")  # CRLF line ends, too
    src.write_bytes(wiki.read_bytes()[:200_000])
    text_mod.prepare_text([src], "gpt2", tmp_path / "out", 0.1, "t")
    whole = src.read_text()
    enc = get_tokenizer("gpt2")
    train, val = whole[: int(len(whole) * 0.9)], whole[int(len(whole) * 0.9):]
    assert open_split(tmp_path / "out", "train").tolist() == enc.encode(train, special=False)
    assert open_split(tmp_path / "out", "val").tolist() == enc.encode(val, special=False)


def test_large_char_vocabulary_uses_uint32(tmp_path):
    from nanogpt.data.prepare.text import prepare_text

    src = tmp_path / "cjk.txt"
    src.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000 // 2)) * 2 + "".join(
        chr(c) for c in range(0x20000, 0x20000 + 35_000)))
    meta = prepare_text([src], "char", tmp_path / "out", 0.1, "t")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    assert open_split(tmp_path / "out", "train").dtype == np.uint32


# ---- bad input -----------------------------------------------------------------------------------


def test_missing_input(compose_cfg, tmp_path):
    with pytest.raises(DataError, match="matches no file; check data.input"):
        prepare(compose_cfg, "data=text", f"data.input={tmp_path}/nope/*.txt", f"data.data_dir={tmp_path}/o")
    with pytest.raises(DataError, match="no input given"):
        prepare(compose_cfg, "data=text", f"data.data_dir={tmp_path}/o")


def test_empty_input(compose_cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="input is empty"):
        prepare(compose_cfg, "data=text", f"data.input={tmp_path}/empty.txt", f"data.data_dir={tmp_path}/o")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare(compose_cfg, "data=text", f"data.input={tmp_path}/emptydir", f"data.data_dir={tmp_path}/o")


def test_too_little_text_for_a_val_split(compose_cfg, tmp_path):
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(DataError, match="train split came out empty"):
        prepare(compose_cfg, "data=text", f"data.input={tmp_path}/tiny.txt", "data.tokenizer=char",
                f"data.data_dir={tmp_path}/o")
    assert list((tmp_path / "o").iterdir()) == []  # nothing half-written


def test_non_utf8_is_replaced_with_a_warning(compose_cfg, tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 20)
    with caplog.at_level(logging.WARNING):
        meta = prepare(compose_cfg, "data=text", f"data.input={tmp_path}/latin1.txt", "data.tokenizer=char",
                       f"data.data_dir={tmp_path}/o")
    assert "latin1.txt is not valid UTF-8" in caplog.text and "U+FFFD" in caplog.text
    assert "\ufffd" in meta["chars"] and "é" not in meta["chars"]


def test_interrupted_prepare_leaves_nothing(compose_cfg, tmp_path, monkeypatch):
    import nanogpt.data.prepare.text as text_mod

    (tmp_path / "in.txt").write_text("some text\n" * 1000)
    out = tmp_path / "o"
    original = text_mod.encode_arrays

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod, "encode_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(compose_cfg, "data=text", f"data.input={tmp_path}/in.txt", f"data.data_dir={out}")
    assert list(out.iterdir()) == []


def test_rerun_replaces_the_old_dataset(compose_cfg, tmp_path):
    (tmp_path / "in.txt").write_text("abcdefghij" * 100)
    out = f"data.data_dir={tmp_path}/o"
    first = prepare(compose_cfg, "data=text", f"data.input={tmp_path}/in.txt", "data.tokenizer=char", out)
    (tmp_path / "in.txt").write_text("xyz" * 100)
    second = prepare(compose_cfg, "data=text", f"data.input={tmp_path}/in.txt", "data.tokenizer=char", out)
    assert first["vocab_size"] == 10 and second["vocab_size"] == 3 and read_meta(tmp_path / "o") == second
    assert len(open_split(tmp_path / "o", "train")) == 270


# ---- the console script --------------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanogpt.cli.prepare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # two fresh processes
def test_cli_text_and_one_line_errors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    ok = cli("data=text", "data.input=docs/*.txt", "data.tokenizer=char", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "data/text/train.bin: 1,935 tokens (char, uint16)" in ok.stdout
    meta = json.loads((tmp_path / "data" / "text" / "meta.json").read_text())
    assert meta["splits"]["val"]["tokens"] == 215
    bad = cli("data=text", "data.input=missing/*.txt", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: input 'missing/*.txt' matches no file")
