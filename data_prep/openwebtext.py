"""OpenWebText with the GPT-2 BPE, as nanoGPT prepares it: ~9B train tokens, ~4M val tokens (uint16).

    python data_prep/openwebtext.py                                  # from the Hugging Face hub
    python data_prep/openwebtext.py --dataset /mnt/owt_saved         # a Dataset.save_to_disk folder
    python data_prep/openwebtext.py --files '/mnt/owt/*.parquet'     # local data files (.jsonl, .txt, ...)

nanoGPT's split (test_size=0.0005, seed 2357), `encode_ordinary` + end-of-text (50256) after every
document, worker processes, a progress bar, flat memory. Interrupted? Run the same command again:
finished shards are kept, and the result is the same bytes as an uninterrupted run.
"""

import os
import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nanogpt_jax import openwebtext, prepare  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "data/openwebtext", "Folder for train.bin, val.bin and meta.json.")
_DATASET = flags.DEFINE_string("dataset", openwebtext.DEFAULT_DATASET,
                               "Hugging Face hub id, or a folder written by Dataset.save_to_disk.")
_FILES = flags.DEFINE_list("files", [], "Local data files or quoted globs (.jsonl/.json/.parquet/.arrow/.csv, "
                           "or .txt: one document per file); replaces --dataset.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The column holding each document's text.")
_NUM_PROC = flags.DEFINE_integer("num_proc", os.cpu_count() or 1, "Tokenizer processes.", lower_bound=1)
_TEST_SIZE = flags.DEFINE_float("test_size", openwebtext.TEST_SIZE, "Fraction of the documents for val.bin.")
_SEED = flags.DEFINE_integer("seed", openwebtext.SPLIT_SEED, "Seed of the train/val split.")
_SHARD_DOCS = flags.DEFINE_integer("shard_docs", openwebtext.SHARD_DOCS, "Documents between resume points.",
                                   lower_bound=1)

if __name__ == "__main__":
    prepare.run_script(lambda: openwebtext.prepare_openwebtext(
        _OUT_DIR.value, dataset=_DATASET.value, files=_FILES.value, text_field=_TEXT_FIELD.value,
        num_proc=_NUM_PROC.value, test_size=_TEST_SIZE.value, seed=_SEED.value, shard_docs=_SHARD_DOCS.value))
