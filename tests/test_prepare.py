"""data_prep: Shakespeare (char and BPE) from the offline mirror, any text, OpenWebText from a local HF dataset."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_jax import data, openwebtext, prepare, storage, tokenizer
from nanogpt_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ["NANOGPT_DATA_MIRROR"]) / "tinyshakespeare" / "input.txt"
WIKI = Path(os.environ["NANOGPT_DATA_MIRROR"]) / "wikitext-2" / "wiki.test.raw"
EOT = 50256


def ids(path: Path, dtype=np.uint16) -> list[int]:
    return np.fromfile(path, dtype=dtype).tolist()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- Shakespeare ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_char_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sc") / "shakespeare_char"
    prepare.shakespeare_char(out)
    return out


def test_shakespeare_char_is_nanogpts(shakespeare_char_dir):
    out = shakespeare_char_dir
    text = SHAKESPEARE.read_text()
    # nanoGPT's data/shakespeare_char/prepare.py, restated: sorted characters, first 90% train, uint16
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    nano = {"train": np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16),
            "val": np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)}
    for split, expected in nano.items():
        assert (out / f"{split}.bin").read_bytes() == expected.tobytes()
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["chars"]) == ("char", 65, "uint16", chars)
    assert {s: v["tokens"] for s, v in meta["splits"].items()} == {"train": 1_003_854, "val": 111_540}
    tok = data.tokenizer_for(out)
    assert tok.decode(ids(out / "train.bin")) + tok.decode(ids(out / "val.bin")) == text
    assert listing(out) == ["input.txt", "meta.json", "train.bin", "val.bin"]


def test_shakespeare_bpe_counts_and_tokens(tmp_path):
    meta = prepare.shakespeare(tmp_path / "s")
    assert {s: v["tokens"] for s, v in meta["splits"].items()} == {"train": 301_966, "val": 36_059}
    text = SHAKESPEARE.read_text()
    n = len(text)
    enc = tokenizer.gpt2()
    assert ids(tmp_path / "s" / "train.bin") == enc.encode(text[: int(n * 0.9)])  # no EOT, as nanoGPT
    assert ids(tmp_path / "s" / "val.bin") == enc.encode(text[int(n * 0.9):])
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, EOT)


def test_gpt2_safe_cuts_never_change_tokens():
    enc = tokenizer.gpt2()
    rng = random.Random(0)
    for path in (SHAKESPEARE, WIKI):
        text = path.read_text()[:200_000]
        cuts = [m.start() for m in prepare._GPT2_SAFE_CUT.finditer(text)]
        chosen = sorted(rng.sample(cuts, 2000))
        pieces = [text[a:b] for a, b in zip([0, *chosen], [*chosen, len(text)], strict=True)]
        assert sum((enc.encode(p) for p in pieces), []) == enc.encode(text)
    assert prepare.gpt2_safe_cut("abc def\nghi") == 7 and prepare.gpt2_safe_cut("   ") == 0


# ---- any text ------------------------------------------------------------------------------------


def write_docs(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(folder / f"doc{i:03d}.txt")
        paths[-1].write_text(doc)
    return paths


def expected_text_split(docs: list[str], val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """The documented rule for several documents: val is the last whole documents, from the one that
    nanoGPT's character boundary int(n * (1 - val_fraction)) falls in (never the first); EOT ends each."""
    enc = tokenizer.gpt2()
    at = int(sum(map(len, docs)) * (1 - val_fraction))
    first_val = max(1, max(i for i in range(len(docs)) if sum(map(len, docs[:i])) <= at))
    train = [t for doc in docs[:first_val] for t in enc.encode(doc) + [EOT]]
    val = [t for doc in docs[first_val:] for t in enc.encode(doc) + [EOT]]
    return train, val


def test_text_documents_streamed_in_pieces(tmp_path, monkeypatch):
    text = SHAKESPEARE.read_text()
    docs = [text[i * 9000:(i + 1) * 9000 + 37 * i] for i in range(12)]
    docs[3] = "Before <|endoftext|> after, and again <|endoftext|>"  # ordinary text
    write_docs(tmp_path / "in", docs)
    monkeypatch.setattr(prepare, "BLOCK_CHARS", 1000)  # many blocks and pieces per file
    monkeypatch.setattr(prepare, "PIECE_CHARS", 3000)
    meta = prepare.text([str(tmp_path / "in" / "*.txt")], tmp_path / "out", num_threads=2)
    train, val = expected_text_split(docs)
    assert ids(tmp_path / "out" / "train.bin") == train and ids(tmp_path / "out" / "val.bin") == val
    assert train.count(EOT) + val.count(EOT) == len(docs)  # one per document
    sha256 = storage.sha256_file(tmp_path / "out" / "train.bin")  # what a copy from a bucket is checked against
    assert meta["splits"]["train"] == {"tokens": len(train), "max_id": EOT, "sha256": sha256}
    assert listing(tmp_path / "out") == ["meta.json", "train.bin", "val.bin"]


def test_text_literal_endoftext_is_ordinary_text(tmp_path):
    docs = [f"doc {i} says <|endoftext|> twice <|endoftext|>" for i in range(40)]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n\n")
    prepare.text([str(tmp_path / "docs.txt")], tmp_path / "out", per_line=True, val_fraction=0.25)
    tokens = ids(tmp_path / "out" / "train.bin") + ids(tmp_path / "out" / "val.bin")
    assert tokens.count(EOT) == len(docs)  # exactly one per line
    assert tokenizer.gpt2().decode([t for t in tokens if t != EOT]) == "".join(docs)  # the literal text is kept


def test_text_splits_at_document_boundaries(tmp_path):
    """Several documents: val takes the last whole ones, each with one EOT (a literal "<|endoftext|>" is
    text); one document: cut at the fraction as nanoGPT cuts Shakespeare, with no EOT at the cut."""
    enc = tokenizer.gpt2()
    docs = ["hello <|endoftext|> world", "second doc"]
    prepare.text([str(p) for p in write_docs(tmp_path / "two", docs)], tmp_path / "out2")
    train, val = ids(tmp_path / "out2" / "train.bin"), ids(tmp_path / "out2" / "val.bin")
    assert train == enc.encode(docs[0]) + [EOT] and val == enc.encode(docs[1]) + [EOT]
    assert (train + val).count(EOT) == 2
    one = "To be, or not to be: that is the question. " * 20
    (tmp_path / "one.txt").write_text(one)
    prepare.text([str(tmp_path / "one.txt")], tmp_path / "out1", val_fraction=0.25)
    at = int(len(one) * 0.75)
    assert ids(tmp_path / "out1" / "train.bin") == enc.encode(one[:at])  # no EOT where the document is cut
    assert ids(tmp_path / "out1" / "val.bin") == enc.encode(one[at:]) + [EOT]
    assert [prepare.split_point(starts, 100, 0.1) for starts in ([0], [0, 95], [0, 30, 60, 91], [0, 30, 60, 90])] \
        == [90, 95, 60, 90]


def test_text_char_vocab_from_a_folder_and_uint32(tmp_path):
    write_docs(tmp_path / "in" / "sub", ["hello ", "world\n"])
    (tmp_path / "in" / ".hidden").write_text("\u00ff")  # hidden files are skipped
    meta = prepare.text([str(tmp_path / "in")], tmp_path / "out", tokenizer="char", val_fraction=0.5)
    assert meta["chars"] == sorted(set("hello world\n")) and meta["dtype"] == "uint16"
    tok = data.tokenizer_for(tmp_path / "out")
    assert tok.decode(ids(tmp_path / "out" / "train.bin") + ids(tmp_path / "out" / "val.bin")) == "hello world\n"
    big = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))  # more symbols than uint16 holds
    (tmp_path / "big.txt").write_text(big)
    meta = prepare.text([str(tmp_path / "big.txt")], tmp_path / "big", tokenizer="char")
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    train = data.open_split(tmp_path / "big", "train")
    assert train.dtype == np.uint32 and train[-1] == 62_999


def test_text_bad_inputs_write_nothing(tmp_path):
    (tmp_path / "ok.txt").write_text("some text " * 100)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 10)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("x")
    out = tmp_path / "out"
    cases = [
        (["missing.txt"], {}, "input 'missing.txt' matches no file"),
        ([str(tmp_path / "nothing*.md")], {}, "matches no file"),
        ([], {}, "no input files given"),
        ([str(tmp_path / "ok.txt"), str(tmp_path / "latin1.txt")], {}, "latin1.txt is not UTF-8 text"),
        ([str(tmp_path / "empty.txt")], {}, "the input has no text"),
        ([str(tmp_path / "one.txt")], {}, "the train split came out empty"),
        ([str(tmp_path / "ok.txt")], {"tokenizer": "bpe"}, "unknown tokenizer 'bpe'"),
        ([str(tmp_path / "ok.txt")], {"tokenizer": "char", "per_line": True}, "--per_line needs --tokenizer gpt2"),
        ([str(tmp_path / "ok.txt")], {"val_fraction": 1.0}, "--val_fraction=1.0 must lie strictly between"),
    ]
    for inputs, kwargs, message in cases:
        with pytest.raises(DataError, match=message) as e:
            prepare.text([str(p) for p in inputs], out, **kwargs)
        assert "\n" not in str(e.value)
    assert not out.exists()
    with pytest.raises(DataError, match="ok.txt is a file; pass --out_dir a folder"):
        prepare.text([str(tmp_path / "ok.txt")], tmp_path / "ok.txt" / "out")
    with pytest.raises(DataError, match="cannot read input file .*a_folder.txt"):
        (tmp_path / "a_folder.txt").mkdir()
        prepare.prepare_text([tmp_path / "a_folder.txt"], out)


def test_a_failed_run_leaves_the_previous_data_intact(tmp_path):
    (tmp_path / "a.txt").write_text("first corpus " * 500)
    prepare.text([str(tmp_path / "a.txt")], tmp_path / "out")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in listing(tmp_path / "out")}
    (tmp_path / "b.txt").write_bytes(b"second corpus " * 20000 + b"\xff")  # fails after writing a while
    with pytest.raises(DataError, match="not UTF-8"):
        prepare.text([str(tmp_path / "b.txt")], tmp_path / "out")
    assert {n: (tmp_path / "out" / n).read_bytes() for n in listing(tmp_path / "out")} == before


# ---- OpenWebText from a local Hugging Face dataset ----------------------------------------------

# Hugging Face datasets: the `datasets` extra (in the dev extra `make test` installs). Only the tests marked
# needs_datasets use it; the module's other tests run without it.
datasets = importlib.import_module("datasets") if importlib.util.find_spec("datasets") else None
needs_datasets = pytest.mark.skipif(datasets is None, reason="needs Hugging Face datasets: pip install "
                                    "'nanogpt_jax[datasets]' (`make test` installs it with the dev extra)")
DOCS = [f"Document {i}: " + "the weather and the sea. " * (i % 9) + ("<|endoftext|> in the text" if i % 5 == 0 else "")
        for i in range(300)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's folder, never in ~/.cache."""
    if datasets is not None:
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("owt") / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "url": [f"u{i}" for i in range(len(DOCS))]}).save_to_disk(str(path))
    return path


def nanogpt_owt(docs: list[str], test_size: float) -> dict[str, bytes]:
    """nanoGPT's data/openwebtext/prepare.py, restated: split, encode_ordinary + EOT, uint16 in order."""
    split = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=test_size, seed=2357, shuffle=True)
    enc = tokenizer.gpt2()
    return {name: np.array([t for doc in split[hf]["text"] for t in enc.encode(doc) + [EOT]], np.uint16).tobytes()
            for name, hf in (("train", "train"), ("val", "test"))}


def owt(source: Path | str, out: Path, **kw) -> dict:
    kw = {"num_proc": 1, "test_size": 0.05, "shard_docs": 40, **kw}
    return openwebtext.prepare_openwebtext(out, dataset=str(source), **kw)


@needs_datasets
def test_openwebtext_is_nanogpts_recipe(saved, tmp_path):
    meta = owt(saved, tmp_path / "out")
    expected = nanogpt_owt(DOCS, 0.05)
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == expected[split]
    tokens = ids(tmp_path / "out" / "train.bin") + ids(tmp_path / "out" / "val.bin")
    assert tokens.count(EOT) == len(DOCS)  # literal "<|endoftext|>" in 60 documents is ordinary text
    assert (meta["tokenizer"], meta["dtype"], meta["splits"]["val"]["tokens"]) == ("gpt2", "uint16",
                                                                                 len(expected["val"]) // 2)
    assert listing(tmp_path / "out") == ["meta.json", "train.bin", "val.bin"]
    assert data.Dataset(tmp_path / "out", block_size=16).vocab_size == 50257


@needs_datasets
def test_openwebtext_worker_processes_give_the_same_bytes(saved, tmp_path):
    owt(saved, tmp_path / "one")
    owt(saved, tmp_path / "two", num_proc=2)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@needs_datasets
def test_openwebtext_resumes_after_an_interruption(saved, tmp_path, monkeypatch):
    owt(saved, tmp_path / "clean")
    out, real, seen = tmp_path / "out", openwebtext.encode_documents, []

    def interrupted(texts):
        seen.append(texts[0])
        if len(seen) == 4:  # val is 1 task of 15 documents; train shards are 40 documents, 1 task each
            raise KeyboardInterrupt  # Ctrl-C in the third train shard
        return real(texts)

    monkeypatch.setattr(openwebtext, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        owt(saved, out)
    assert listing(out) == [openwebtext.WORK_DIR]  # nothing under a final name
    progress = json.loads((out / openwebtext.WORK_DIR / "progress.json").read_text())
    assert progress["splits"]["train"]["shards_done"] == 2 and progress["splits"]["val"]["shards_done"] == 1
    done_first_docs = seen[:3]
    seen.clear()
    monkeypatch.setattr(openwebtext, "encode_documents", lambda texts: seen.append(texts[0]) or real(texts))
    owt(saved, out)
    assert len(seen) == 6 and not set(seen) & set(done_first_docs)  # 285 train docs: 8 shards, 2 done, 6 redone
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert listing(out) == ["meta.json", "train.bin", "val.bin"]


@needs_datasets
def test_openwebtext_changed_settings_or_damaged_files_start_over(saved, tmp_path, monkeypatch):
    real, calls = openwebtext.encode_documents, []

    def interrupted(texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(openwebtext, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        owt(saved, tmp_path / "out")  # val and one train shard done
    os.truncate(tmp_path / "out" / openwebtext.WORK_DIR / "train.bin", 10)  # damaged behind our back
    monkeypatch.setattr(openwebtext, "encode_documents", real)
    owt(saved, tmp_path / "out")
    for split, expected in nanogpt_owt(DOCS, 0.05).items():
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == expected
    calls.clear()
    monkeypatch.setattr(openwebtext, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        owt(saved, tmp_path / "out2")
    monkeypatch.setattr(openwebtext, "encode_documents", real)
    owt(saved, tmp_path / "out2", shard_docs=25, test_size=0.1)  # other settings
    for split, expected in nanogpt_owt(DOCS, 0.1).items():
        assert (tmp_path / "out2" / f"{split}.bin").read_bytes() == expected


@needs_datasets
def test_openwebtext_local_files(tmp_path):
    ds = datasets.Dataset.from_dict({"body": DOCS})
    ds.to_json(str(tmp_path / "docs.jsonl"))
    openwebtext.prepare_openwebtext(tmp_path / "j", files=[str(tmp_path / "*.jsonl")], text_field="body",
                                    num_proc=1, test_size=0.05)
    expected = nanogpt_owt(DOCS, 0.05)
    assert (tmp_path / "j" / "train.bin").read_bytes() == expected["train"]
    txt = write_docs(tmp_path / "txt", DOCS[:50])
    openwebtext.prepare_openwebtext(tmp_path / "t", files=[str(p) for p in txt], num_proc=1, test_size=0.1)
    tokens = ids(tmp_path / "t" / "train.bin") + ids(tmp_path / "t" / "val.bin")
    assert tokens.count(EOT) == 50  # a .txt file is one document


@needs_datasets
def test_openwebtext_bad_sources(saved, tmp_path):
    with pytest.raises(DataError, match="cannot load dataset 'no-such/dataset' .*offline, pass --dataset") as e:
        owt("no-such/dataset", tmp_path / "o")  # an unknown name (HF_HUB_OFFLINE=1 in tests)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="has no column 'content' .*--text_field"):
        owt(saved, tmp_path / "o", text_field="content")
    with pytest.raises(DataError, match="matches no file"):
        owt(saved, tmp_path / "o", files=[str(tmp_path / "*.parquet")])
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot load dataset .*broken.parquet"):
        owt(saved, tmp_path / "o", files=[str(tmp_path / "broken.parquet")])
    with pytest.raises(DataError, match="--files must all be one kind"):
        owt(saved, tmp_path / "o", files=[str(tmp_path / "broken.parquet"), str(SHAKESPEARE)])
    assert not (tmp_path / "o").exists()


# ---- the scripts ---------------------------------------------------------------------------------


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "data_prep" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_fails_in_one_line(name: str, args: list[str], message: str, cwd: Path) -> None:
    r = script(name, *args, cwd=cwd)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith(f"error: {message}"), (name, r.stderr)
    assert "Traceback" not in r.stderr


def test_scripts_write_the_default_folder_and_fail_in_one_line(tmp_path, shakespeare_char_dir):
    r = script("shakespeare_char", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("train.bin", "val.bin", "meta.json"):
        written = (tmp_path / "data" / "shakespeare_char" / name).read_bytes()
        assert written == (shakespeare_char_dir / name).read_bytes()
    (tmp_path / "file").write_text("x")
    for name, args, message in [
        ("shakespeare", ["--out_dir", "file/sub"], "cannot write --out_dir file/sub: file is a file"),
        ("text", ["--inputs", "nope/*.txt"], "input 'nope/*.txt' matches no file"),
        ("text", ["--tokenizer", "bpe"], "flag --tokenizer=bpe: value should be one of"),
    ]:
        assert_fails_in_one_line(name, args, message, cwd=tmp_path)


@needs_datasets
def test_openwebtext_script_fails_in_one_line(tmp_path):
    for args, message in [
        (["--dataset", "no-such-dataset"], "cannot load dataset 'no-such-dataset'"),
        (["--files", "nope.parquet"], "input 'nope.parquet' matches no file; check --files"),
    ]:
        assert_fails_in_one_line("openwebtext", args, message, cwd=tmp_path)


# ---- the downloader ------------------------------------------------------------------------------


def test_fetch_prefers_dest_then_mirror_then_url(tmp_path, monkeypatch):
    from nanogpt_jax import download

    dest = tmp_path / "a" / "input.txt"
    assert download.fetch("tinyshakespeare/input.txt", "http://127.0.0.1:9/never", dest) == dest  # the mirror
    assert dest.read_bytes() == SHAKESPEARE.read_bytes() and (dest.stat().st_mode & 0o777) == 0o644
    dest.write_text("kept")
    assert download.fetch("tinyshakespeare/input.txt", "http://127.0.0.1:9/never", dest).read_text() == "kept"
    monkeypatch.delenv("NANOGPT_DATA_MIRROR")
    src = tmp_path / "remote.txt"
    src.write_text("from the url")
    assert download.fetch("x/remote.txt", src.as_uri(), tmp_path / "b" / "r.txt").read_text() == "from the url"
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:9/x.txt \(.*\); offline, put the file "
                                        r"at \$NANOGPT_DATA_MIRROR/d/x.txt") as e:
        download.fetch("d/x.txt", "http://127.0.0.1:9/x.txt", tmp_path / "c" / "d" / "x.txt")
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()  # no partial file, no empty folders it made
