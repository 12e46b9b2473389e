"""Tokenizing a corpus into `train.bin`, `val.bin` and `meta.json` (the data_prep/ scripts call this).

    prepare.shakespeare_char("data/shakespeare_char")   # 65 characters: 1,003,854 / 111,540 tokens
    prepare.shakespeare("data/shakespeare")             # GPT-2 BPE: 301,966 / 36,059 tokens
    prepare.text(["notes/*.md"], "data/notes", tokenizer="gpt2")

Every prepared folder holds the same three files. The .bin files are the token ids one after another,
uint16 (uint32 when the vocabulary has more than 65,536 ids), as nanoGPT writes them; `meta.json` is
the one record of how to read them: `tokenizer`, `vocab_size`, `dtype`, `eot_token`, the `splits`
with their token counts and largest id, the `source`, and for a char vocabulary its `chars`.

Text corpora are split at a document boundary: validation is the last whole documents, as many as
it takes to hold `val_fraction` of the characters (the document that nanoGPT's character boundary
falls in goes to val), and at least the first document stays in train. A corpus of one document is
cut as nanoGPT cuts Shakespeare: the first `1 - val_fraction` of its characters is train, the rest
val. With GPT-2's BPE an end-of-text token follows every document (a file, or a line with
`per_line`), never the cut inside one, except for Shakespeare, where nanoGPT has none. The corpus
is streamed in pieces cut where GPT-2's pre-tokenizer cuts anyway, so memory stays flat (8 bytes
per document) and the tokens equal those of encoding each split whole.

Nothing appears under a final name until it is complete: splits are written to hidden `.partial`
files, renamed into place, and meta.json is written last. A failed run removes its partial files.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from nanogpt_jax import download, storage
from nanogpt_jax import tokenizer as tokenizers
from nanogpt_jax.errors import DataError, UserError, fail

FORMAT = "nanogpt_jax.bins/1"
SPLITS = ("train", "val")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MIRROR = "tinyshakespeare/input.txt"
BLOCK_CHARS = 1 << 20  # characters read from a file at a time
PIECE_CHARS = 1 << 18  # characters per encode call (token lists cost ~30 bytes per token)
# Cutting before " x" or "\nx" (x an ASCII letter or digit) never changes GPT-2's tokens: its
# pre-tokenizer regex (tiktoken's r50k pattern) ends a token there in every context, as the
# whitespace either joins x's token or ends a whitespace run. Checked in tests/test_prepare.py.
_GPT2_SAFE_CUT = re.compile(r"(?=[ \n][A-Za-z0-9])")


# ---- output folder and files ---------------------------------------------------------------------


# local folders that stand for a bucket's folder: commit() uploads what it wrote there
_BUCKET_OF: dict[Path, str] = {}


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a Path after checking it can be created and written (nothing is created yet).

    A URL (gs://bucket/folder): its bucket is checked (exists, credentials), and the folder is built
    in its local cache copy (`storage.cache_folder` under storage.DEFAULT_CACHE_DIR, so this host can
    train on it without downloading); `commit` uploads train.bin, val.bin, then meta.json.

    Raises DataError naming the folder when it is a file or lies in a folder that cannot be written;
    UserError for a bucket that does not exist or cannot be reached.
    """
    if storage.is_url(out_dir):
        url = os.fspath(out_dir).rstrip("/")
        storage.check_bucket(url, "--out_dir")
        local = storage.cache_folder(url, storage.DEFAULT_CACHE_DIR)
        _BUCKET_OF[local] = url
        return local
    out = Path(out_dir).expanduser()
    probe = out
    while not probe.exists():  # the nearest existing ancestor is where mkdir will write
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"cannot write --out_dir {out}: {probe} is a file; pass --out_dir a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"cannot write --out_dir {out}: {probe} is not writable; pass --out_dir a writable folder")
    return out


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out_dir {out} ({e.strerror}); pass --out_dir a writable folder") from None


def partial_path(out_dir: Path, split: str) -> Path:
    """Where a split is written until it is complete."""
    return out_dir / f".{split}.bin.partial"


class BinWriter:
    """Appends token ids to a .bin file in `dtype`, counting them and tracking the largest id."""

    def __init__(self, path: Path, dtype: str, *, keep_tokens: int | None = None):
        """Open `path` for writing; `keep_tokens`: keep that many tokens already there (a resume)."""
        self.path, self.dtype = path, np.dtype(dtype)
        self.tokens, self.max_id = 0, -1
        if keep_tokens:
            os.truncate(path, keep_tokens * self.dtype.itemsize)  # drop the tail of an unfinished shard
            self.tokens = keep_tokens
        self._f = open(path, "ab" if keep_tokens else "wb")

    def write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.max_id = max(self.max_id, int(ids.max()))
            self._f.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.tokens += ids.size

    def sync(self) -> None:
        """Flush to the disk, so that a resume point recorded after this is really there."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def write_json(path: Path, obj: dict) -> None:
    """Write JSON to `path` atomically (a temporary file renamed into place)."""
    download.write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def commit(out_dir: Path, tok: tokenizers.Tokenizer, splits: dict[str, dict], source: str) -> dict:
    """Rename each split's partial file into place, then write meta.json (last); returns the meta.

    `splits` maps a split name to {"tokens": n, "max_id": k}. Raises DataError for an empty split.
    """
    for split, stats in splits.items():
        if stats["tokens"] == 0:
            raise DataError(f"the {split} split came out empty ({source}); give more input text")
    # sha256: a copy of the folder (storage.local_data_dir) is checked against it
    splits = {s: {**v, "sha256": storage.sha256_file(partial_path(out_dir, s))} for s, v in splits.items()}
    meta = {"format": FORMAT, **tok.meta(), "splits": splits, "source": source}
    for split in splits:
        os.replace(partial_path(out_dir, split), out_dir / f"{split}.bin")
    write_json(out_dir / "meta.json", meta)
    url = _BUCKET_OF.get(out_dir)
    if url is not None:  # meta.json last: a folder with meta.json is complete
        for name in (*(f"{s}.bin" for s in splits), "meta.json"):
            logging.info("uploading %s to %s", name, url)
            storage.upload(out_dir / name, f"{url}/{name}")
        for s in splits:  # this host's copy is the one just checked: no download to train here
            storage.write_atomic(out_dir / f"{s}.bin.sha256", splits[s]["sha256"])
        out_dir = url
    logging.info("wrote %s: %s", out_dir, ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in splits.items()))
    return meta


# ---- reading text --------------------------------------------------------------------------------


def resolve_inputs(patterns: Sequence[str], flag: str = "--inputs") -> list[Path]:
    """Files named by paths, folders (every file below, hidden ones skipped) or globs, in the order given.

    `flag` is the script's flag that gave the patterns, named in the errors.
    Raises DataError when nothing is given or a pattern matches no file.
    """
    if not any(str(p).strip() for p in patterns):
        raise DataError(f"no input files given; pass {flag} FILE,FOLDER,'GLOB' (e.g. 'books/*.txt')")
    files: dict[Path, None] = {}  # ordered set
    for pattern in (str(p).strip() for p in patterns if str(p).strip()):
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"input {pattern!r} matches no file; check {flag}")
        files.update(dict.fromkeys(found))
    return list(files)


def read_blocks(path: Path) -> Iterator[str]:
    """A UTF-8 text file, `BLOCK_CHARS` characters at a time (universal newlines, as nanoGPT's `open`).

    Raises DataError naming the file when it cannot be read or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8") as f:
            while block := f.read(BLOCK_CHARS):
                yield block
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a block); "
                        "convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read input file {path} ({e.strerror or e}); check the path and "
                        "its permissions") from None


def documents(files: Sequence[Path], per_line: bool) -> Iterator[str | None]:
    """The corpus as text pieces in order; None ends a document (a file, or a non-empty line)."""
    for path in files:
        if per_line:
            rest = ""
            for block in read_blocks(path):
                lines = (rest + block).split("\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        yield from (line, None)
            if rest:
                yield from (rest, None)
        else:
            empty = True
            for block in read_blocks(path):
                empty = False
                yield block
            if not empty:
                yield None


def count_chars(files: Sequence[Path], per_line: bool, want_chars: bool) -> tuple[int, list[str], array]:
    """The first pass over the corpus: its characters, (if asked) their sorted set, and where each
    document starts (a character offset; 8 bytes per document)."""
    total, seen, starts, new_doc = 0, set(), array("q"), True
    for text in documents(files, per_line):
        if text is None:
            new_doc = True
        elif text:
            if new_doc:
                starts.append(total)
                new_doc = False
            total += len(text)
            if want_chars:
                seen.update(chr(c) for c in np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32)))
    return total, sorted(seen), starts


def split_point(doc_starts: Sequence[int], total: int, val_fraction: float) -> int:
    """The character offset where val begins: a document's start, or inside the only document.

    nanoGPT's boundary is `int(total * (1 - val_fraction))` characters (its `data[:int(n * 0.9)]`).
    With several documents, val begins at the last document that starts at or before it, so val
    holds whole documents and at least `val_fraction` of the characters; the first document always
    stays in train. With one document (or none) the boundary cuts it.

    Args:
      doc_starts: ascending character offsets of the documents, the first 0 (`count_chars`).
      total: the corpus's characters. val_fraction: in (0, 1).
    """
    at = int(total * (1 - val_fraction))
    if len(doc_starts) < 2:
        return at
    return doc_starts[max(1, bisect.bisect_right(doc_starts, at) - 1)]


def gpt2_safe_cut(text: str) -> int:
    """The last index > 0 at which `text` can be cut without changing its GPT-2 tokens; 0 if none."""
    for lo in (max(0, len(text) - 65536), 0):
        last = 0
        for m in _GPT2_SAFE_CUT.finditer(text, lo):
            last = m.start()
        if last:
            return last
    return 0


def split_pieces(docs: Iterable[str | None], split_at: int, eot: bool,
                 cut: Callable[[str], int]) -> Iterator[tuple[str, str | None]]:
    """(split, text) in corpus order, text at most ~PIECE_CHARS long; text None is an end-of-text token.

    The first `split_at` characters go to "train", the rest to "val" (`split_point`). With `eot` an
    end-of-text token ends each document, and only its end: a document that the boundary cuts gets
    none in train. `cut(text)` gives where a long text may be cut (0: nowhere yet).
    """
    pos, split, buf, doc_chars = 0, "train", "", 0
    for text in docs:
        if text is None:  # end of a document
            if buf:
                yield split, buf
                buf = ""
            if eot and doc_chars:
                yield split, None
            doc_chars = 0
            continue
        if split == "train" and pos + len(text) > split_at:  # the train/val boundary
            k = split_at - pos
            buf, pos, doc_chars, text = buf + text[:k], split_at, doc_chars + k, text[k:]
            if buf:
                yield "train", buf
            split, buf = "val", ""
        buf, pos, doc_chars = buf + text, pos + len(text), doc_chars + len(text)
        while len(buf) >= PIECE_CHARS and (j := cut(buf[:PIECE_CHARS]) or cut(buf)):
            yield split, buf[:j]  # at most PIECE_CHARS, unless the text offers no cut that early
            buf = buf[j:]
    if buf:
        yield split, buf


def prepare_text(files: Sequence[Path], out_dir: str | os.PathLike, *, tokenizer: str = "gpt2",
                 val_fraction: float = 0.1, per_line: bool = False, eot: bool = True, source: str = "",
                 num_threads: int = 0) -> dict:
    """Tokenize text `files` into out_dir/{train,val}.bin and meta.json; returns the meta dict.

    Args:
      files: UTF-8 text files, in corpus order.
      tokenizer: "gpt2" (tiktoken's GPT-2 BPE, `encode_ordinary`) or "char" (the sorted set of the
        corpus's characters, nanoGPT's shakespeare_char vocabulary).
      val_fraction: the last fraction of the characters that is validation, in (0, 1): whole
        documents when there are several (see `split_point`).
      per_line: each non-empty line is a document (else each file).
      eot: with gpt2, an end-of-text token (50256) after each document.
      num_threads: tiktoken threads (0: every core).
    Raises:
      DataError: unreadable or non-UTF-8 input, an empty corpus or split, an unwritable out_dir.
    """
    if tokenizer not in ("gpt2", "char"):
        raise DataError(f"unknown tokenizer {tokenizer!r}; use --tokenizer gpt2 or char")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction={val_fraction} must lie strictly between 0 and 1")
    out = check_out_dir(out_dir)
    files = [Path(f) for f in files]
    source = source or ",".join(map(str, files))
    total, chars, doc_starts = count_chars(files, per_line, want_chars=tokenizer == "char")
    if total == 0:
        raise DataError(f"the input has no text ({len(files)} file(s), 0 characters); check --inputs")
    tok = tokenizers.gpt2() if tokenizer == "gpt2" else tokenizers.CharTokenizer(chars)
    dtype = tok.meta()["dtype"]
    split_at = split_point(doc_starts, total, val_fraction)
    cut = gpt2_safe_cut if tokenizer == "gpt2" else len
    threads = num_threads or os.cpu_count() or 1
    logging.info("tokenizing %d file(s), %s characters, with %s", len(files), f"{total:,}", tok.name)
    created = not out.exists()
    make_out_dir(out)
    writers = {s: BinWriter(partial_path(out, s), dtype) for s in SPLITS}
    eot_ids = np.array([tok.eot_token or 0], dtype=np.uint32)
    done = False
    try:
        pieces = split_pieces(documents(files, per_line), split_at, eot and tok.eot_token is not None, cut)
        with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", disable=total < 1 << 24) as bar:
            for group in _batched(pieces, 2 * threads):  # bounded: a few pieces' token lists at a time
                texts = [t for _, t in group if t is not None]
                encoded = iter(tok.encode_batch(texts, num_threads=threads))
                for split, text in group:
                    writers[split].write(eot_ids if text is None else next(encoded))
                bar.update(sum(map(len, texts)))
        for w in writers.values():
            w.close()
        meta = commit(out, tok, {s: {"tokens": w.tokens, "max_id": w.max_id} for s, w in writers.items()}, source)
        done = True
        return meta
    finally:
        for s, w in writers.items():
            w.close()
            partial_path(out, s).unlink(missing_ok=True)
        if created and not done and not any(out.iterdir()):
            out.rmdir()  # nothing written


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while group := list(islice(it, n)):
        yield group


# ---- the datasets --------------------------------------------------------------------------------


def shakespeare_input(out_dir: Path) -> Path:
    """TinyShakespeare's input.txt in `out_dir` (as nanoGPT keeps it), from the data mirror when one is set."""
    return download.fetch(SHAKESPEARE_MIRROR, SHAKESPEARE_URL, out_dir / "input.txt")


def shakespeare_char(out_dir: str | os.PathLike = "data/shakespeare_char") -> dict:
    """nanoGPT's shakespeare_char: 65 sorted characters, 90/10 split, uint16; byte-identical bins."""
    out = check_out_dir(out_dir)
    return prepare_text([shakespeare_input(out)], out, tokenizer="char", source=f"tinyshakespeare {SHAKESPEARE_URL}")


def shakespeare(out_dir: str | os.PathLike = "data/shakespeare") -> dict:
    """nanoGPT's shakespeare: GPT-2 BPE of the 90/10 character split, no end-of-text token."""
    out = check_out_dir(out_dir)
    return prepare_text([shakespeare_input(out)], out, tokenizer="gpt2", eot=False,
                        source=f"tinyshakespeare {SHAKESPEARE_URL}")


def text(inputs: Sequence[str], out_dir: str | os.PathLike = "data/text", *, tokenizer: str = "gpt2",
         per_line: bool = False, val_fraction: float = 0.1, num_threads: int = 0) -> dict:
    """Any local text: `inputs` are files, folders or globs (see `resolve_inputs` and `prepare_text`)."""
    if per_line and tokenizer == "char":
        raise DataError("--per_line needs --tokenizer gpt2: a char vocabulary has no end-of-text token to "
                        "separate lines (its documents are whole files)")
    files = resolve_inputs(inputs)
    return prepare_text(files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction, per_line=per_line,
                        source="text " + ",".join(map(str, inputs)), num_threads=num_threads)


# ---- the scripts' entry point --------------------------------------------------------------------


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


def run_script(fn: Callable[[], object]) -> None:
    """Run a data_prep script: absl flags, INFO logging, and one-line errors for bad flags and bad input."""

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {' '.join(argv[1:])!r}; pass settings as --flag=value (see --help)")
        logging.set_verbosity(logging.INFO)
        try:
            fn()
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")

    app.run(_main, flags_parser=_parse_flags)
