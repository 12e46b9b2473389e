"""Data: tokenizers, the one downloader, dataset preparation (`nanogpt-prepare`) and the loader."""

from nanogpt.data.download import fetch
from nanogpt.data.loader import TrainBatches, check_vocab, open_split, read_meta, val_batches
from nanogpt.data.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta

__all__ = [
    "TrainBatches",
    "Tokenizer",
    "check_vocab",
    "fetch",
    "get_tokenizer",
    "open_split",
    "read_meta",
    "tokenizer_from_meta",
    "val_batches",
]
