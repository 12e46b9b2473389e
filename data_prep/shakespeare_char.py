"""TinyShakespeare, one token per character (nanoGPT's shakespeare_char): 65 symbols, 90/10 split.

    python data_prep/shakespeare_char.py [--out_dir data/shakespeare_char]

Writes train.bin (1,003,854 tokens), val.bin (111,540) and meta.json; the .bin files are
byte-identical to nanoGPT's. input.txt comes from $NANOGPT_DATA_MIRROR when set, else is downloaded.
"""

import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nanogpt_jax import prepare  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "data/shakespeare_char", "Folder for train.bin, val.bin and meta.json.")

if __name__ == "__main__":
    prepare.run_script(lambda: prepare.shakespeare_char(_OUT_DIR.value))
