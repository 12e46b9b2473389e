"""TinyShakespeare with the GPT-2 BPE (nanoGPT's shakespeare), for finetuning GPT-2.

    python data_prep/shakespeare.py [--out_dir data/shakespeare]

Writes train.bin (301,966 tokens), val.bin (36,059) and meta.json: tiktoken's gpt2 encoding of
nanoGPT's 90/10 character split. input.txt comes from $NANOGPT_DATA_MIRROR when set, else is downloaded.
"""

import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nanogpt_jax import prepare  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "data/shakespeare", "Folder for train.bin, val.bin and meta.json.")

if __name__ == "__main__":
    prepare.run_script(lambda: prepare.shakespeare(_OUT_DIR.value))
