"""Any local text corpus (files, folders, globs) -> train.bin / val.bin, streamed in pieces.

The corpus is the input files in sorted order, with GPT-2's end-of-text token between files. The
last `val_fraction` of its characters is validation (nanoGPT's split for Shakespeare). Two passes,
neither holding the corpus in memory: one counts characters (and collects the char vocabulary),
the other tokenizes pieces cut where GPT-2's pre-tokenizer would cut anyway, so the tokens equal
those of encoding each split whole. Line endings are normalised to "\\n" as Python's `open` does.
Input that is not UTF-8 is decoded with U+FFFD replacement characters, with a warning naming the file.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from nanogpt.data.prepare.common import BinWriter, batched, commit, encode_arrays, staged
from nanogpt.data.tokenizer import Tokenizer, get_tokenizer
from nanogpt.errors import DataError

log = logging.getLogger(__name__)

BLOCK_CHARS = 1 << 20  # read size
PIECE_CHARS = 1 << 17  # text per encode call; a batch of pieces is encoded in parallel
# cut points that never change GPT-2 tokens: "letter|space letter" and "non-space newline|non-space"
_SAFE_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])|(?<=\S\n)(?=\S)")


def resolve_inputs(spec: str | list[str]) -> list[Path]:
    """Files named by paths, folders (all files below, hidden ones skipped) or globs; sorted."""
    patterns = [spec] if isinstance(spec, str) else list(spec or [])
    if not any(str(p).strip() for p in patterns):
        raise DataError("no input given; pass data.input=FILE, a folder or a glob (e.g. 'docs/*.txt')")
    files: set[Path] = set()
    for pattern in map(str, patterns):
        path = Path(pattern).expanduser()
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        else:
            matched = [Path(p) for p in glob.glob(str(path), recursive=True)]
            if not matched:
                raise DataError(f"input {pattern!r} matches no file; check data.input")
            files.update(p for p in matched if p.is_file())
    return sorted(files)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_text(path: Path, errors: str = "replace") -> Iterator[str]:
    """A file as UTF-8 text, block by block (universal newlines, Python's default)."""
    with open(path, encoding="utf-8", errors=errors) as f:
        while block := f.read(BLOCK_CHARS):
            yield block


def scan(files: list[Path], want_chars: bool) -> tuple[list[int], list[str]]:
    """Characters per file, and the sorted character set if asked; warns about non-UTF-8 files."""
    counts, seen = [], np.zeros(0x110000, dtype=bool)
    for path in files:
        try:
            blocks = list(_count(path, "strict", seen if want_chars else None))
        except UnicodeDecodeError as e:
            log.warning("%s is not valid UTF-8 (%s); bad bytes become U+FFFD", path, e.reason)
            blocks = list(_count(path, "replace", seen if want_chars else None))
        counts.append(sum(blocks))
    chars = [chr(c) for c in np.flatnonzero(seen)] if want_chars else []
    return counts, chars


def _count(path: Path, errors: str, seen: np.ndarray | None) -> Iterator[int]:
    for text in read_text(path, errors):
        if seen is not None and text:
            seen[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
        yield len(text)


def safe_cut(text: str) -> int:
    """The last index where `text` can be cut without changing its GPT-2 tokens (0 if none)."""
    for start in (max(0, len(text) - 4096), 0):
        cuts = [m.start() for m in _SAFE_CUT.finditer(text, start)]
        if cuts and cuts[-1] > 0:
            return cuts[-1]
    return 0


def pieces(files: list[Path], split_at: int, cut: Callable[[str], int],
           eot: bool) -> Iterator[tuple[str, str | None]]:
    """(split, text) in corpus order; text None is an end-of-text token between two files."""
    pos, split = 0, "train"
    for i, path in enumerate(files):
        if i and eot:
            yield split, None
        buf = ""
        for block in read_text(path):
            if split == "train" and pos + len(block) >= split_at:  # a hard cut, as nanoGPT's split
                head, block = block[: split_at - pos], block[split_at - pos:]
                pos, split = pos + len(head), "val"
                if buf + head:
                    yield "train", buf + head
                buf = ""
            pos += len(block)
            buf += block
            while len(buf) >= PIECE_CHARS:
                j = cut(buf[:PIECE_CHARS]) or PIECE_CHARS
                yield split, buf[:j]
                buf = buf[j:]
        if buf:
            yield split, buf


def write_pieces(items: Iterator[tuple[str, str | None]], tok: Tokenizer, paths: dict[str, Path],
                 num_proc: int = 0) -> None:
    """Encode pieces in parallel batches and append them, in order, to each split's file."""
    writers = {split: BinWriter(path, tok.dtype) for split, path in paths.items()}
    threads = num_proc or os.cpu_count() or 1
    try:
        for group in batched(items, 2 * threads):  # bounded: token lists cost ~36 bytes per token
            encoded = iter(encode_arrays(tok, [t for _, t in group if t is not None], num_proc))
            for split, text in group:
                writers[split].write([tok.eot_token] if text is None else next(encoded))
    finally:
        for w in writers.values():
            w.close()


def prepare_text(files: list[Path], tokenizer: str, data_dir: str | Path, val_fraction: float,
                 source: str, num_proc: int = 0) -> dict:
    """Tokenize `files` into data_dir/{train,val}.bin + meta.json; returns the meta dict."""
    if not files:
        raise DataError(f"no input files in {source}; check data.input")
    counts, chars = scan(files, want_chars=tokenizer == "char")
    total = sum(counts)
    if total == 0:
        raise DataError(f"the input is empty ({len(files)} file(s), 0 characters); check data.input")
    files = [f for f, n in zip(files, counts, strict=True) if n]  # no separator around empty files
    tok = get_tokenizer(tokenizer, chars if tokenizer == "char" else None)
    cut = safe_cut if tokenizer == "gpt2" else len
    split_at = int(total * (1 - val_fraction))
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("tokenizing %d file(s), %s characters, with %s", len(files), f"{total:,}", tokenizer)
    with staged(data_dir) as paths:
        write_pieces(pieces(files, split_at, cut, tok.eot_token is not None), tok, paths, num_proc)
        return commit(data_dir, tok, source, paths)


def prepare(cfg) -> dict:
    """`nanogpt-prepare data=text data.input=...`: the user's own corpus."""
    files = resolve_inputs(cfg.input)
    spec = cfg.input if isinstance(cfg.input, str) else ",".join(map(str, cfg.input))
    tokenizer = cfg.tokenizer or "gpt2"
    return prepare_text(files, tokenizer, cfg.data_dir, cfg.val_fraction, f"text:{spec}", cfg.num_proc)
