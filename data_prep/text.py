"""Any local text corpus: files, folders or globs into train.bin / val.bin, GPT-2 BPE or characters.

    python data_prep/text.py --inputs 'books/*.txt' --out_dir data/books
    python data_prep/text.py --inputs notes.md,papers/ --tokenizer char --out_dir data/notes
    python data_prep/text.py --inputs tweets.txt --per_line --out_dir data/tweets

Documents are whole files (or non-empty lines with --per_line); with gpt2 each one ends with the
end-of-text token 50256 (a literal "<|endoftext|>" in the text is ordinary text). Validation is the
last whole documents, as many as hold --val_fraction of the characters; a single document is cut
there instead, as nanoGPT cuts Shakespeare (no end-of-text token at the cut). Input must be UTF-8;
memory stays flat whatever the corpus size (8 bytes per document).
"""

import os
import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nanogpt_jax import prepare  # noqa: E402

_INPUTS = flags.DEFINE_list("inputs", [], "Text files, folders (every file below) or quoted globs, comma-separated.")
_OUT_DIR = flags.DEFINE_string("out_dir", "data/text", "Folder for train.bin, val.bin and meta.json.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "gpt2", ["gpt2", "char"],
                               "gpt2: tiktoken's GPT-2 BPE; char: one token per distinct character.")
_PER_LINE = flags.DEFINE_bool("per_line", False, "Each non-empty line is a document (gpt2 only).")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.1, "Fraction of the characters, at the end, for val.bin "
                                    "(whole documents when there are several).")
_THREADS = flags.DEFINE_integer("num_threads", os.cpu_count() or 1, "Tokenizer threads.", lower_bound=1)

if __name__ == "__main__":
    prepare.run_script(lambda: prepare.text(_INPUTS.value, _OUT_DIR.value, tokenizer=_TOKENIZER.value,
                                            per_line=_PER_LINE.value, val_fraction=_VAL_FRACTION.value,
                                            num_threads=_THREADS.value))
