"""Hugging Face GPT-2 interop: load OpenAI's weights by name or from an HF folder, export ours back.

HF's GPT-2 keeps its four projection matrices as Conv1D, shaped (in, out): the transpose of
nn.Linear's (out, in). Everything else maps one to one, since our module names are GPT-2's.
Loading builds the model on the meta device and fills it tensor by tensor from the safetensors
file (nanogpt.tensorfile), so gpt2-xl (1.5B parameters) never holds two copies of its weights;
export streams the same way. `transformers` is not needed: config.json is plain JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from nanogpt import tensorfile
from nanogpt.checkpoint import BEST, clean_state_dict, load_checkpoint, unwrap
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.model import GPT, GPTConfig

log = logging.getLogger(__name__)

# name -> (n_layer, n_head, n_embd); all four have a 1024-token context and a 50257-token vocabulary
PRETRAINED = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
HUB_ORG = "openai-community"
GPT2_VOCAB, EOT = 50257, 50256  # GPT-2's vocabulary size and its <|endoftext|> token
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that old HF checkpoints carry
BPE_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# HF config values that change the maths; a checkpoint that differs cannot be run by our GPT
HF_FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,), "tie_word_embeddings": (True,),
            "add_cross_attention": (False,)}


def pretrained_config(name: str) -> GPTConfig:
    """The shape of a named OpenAI GPT-2 (no download)."""
    if name not in PRETRAINED:
        raise CheckpointError(
            f"unknown pretrained model {name!r}: use one of {', '.join(PRETRAINED)} or a local HF folder path"
        )
    n_layer, n_head, n_embd = PRETRAINED[name]
    return GPTConfig(block_size=1024, vocab_size=GPT2_VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


# ---- import ------------------------------------------------------------------------------------


def load_pretrained(name_or_path: str | Path, *, dtype: torch.dtype | None = None, **overrides: Any) -> GPT:
    """GPT-2 by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; from the Hub, cached) or from a local
    HF-format folder (config.json + model.safetensors), on CPU in eval mode.

    Only `dropout` and a smaller `block_size` (the position table is cropped) may be overridden;
    any other setting must equal the checkpoint's. `dtype` converts each tensor as it is read.
    """
    source, folder = str(name_or_path), Path(name_or_path)
    if not folder.is_dir():
        if source not in PRETRAINED and (folder.exists() or os.sep in source or source.startswith(".")):
            names = ", ".join(PRETRAINED)
            raise CheckpointError(f"{source} is not a folder: pass an HF GPT-2 folder or one of {names}")
        pretrained_config(source)  # fails with the list of names for anything else
        folder = download(source)
    cfg = gpt_config(_read_json(folder / "config.json", source), source)
    if source in PRETRAINED and cfg != pretrained_config(source):
        raise CheckpointError(f"{folder} does not hold {source}'s shape ({cfg}); clear that cache entry")
    crop_to = _apply_overrides(cfg, overrides, source)
    with torch.device("meta"):  # shapes only: the real tensors come from the file
        model = GPT(cfg)
    state = _read_weights(model, _weight_files(folder, source), source, dtype)
    model.load_state_dict(state, assign=True)  # take the tensors as they are, no second copy
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced the tied parameter
    if crop_to < cfg.block_size:
        model.crop_block_size(crop_to)
    log.info("loaded %s: %.1fM parameters", source, model.num_params() / 1e6)
    return model.eval()


def download(name: str) -> Path:
    """The Hub snapshot folder of openai-community/<name> with config.json and model.safetensors.

    Reads HF_HUB_OFFLINE, HF_HUB_CACHE and HF_HOME when called (huggingface_hub reads them at import).
    """
    hub = _require("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = f"{HUB_ORG}/{name}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else None)
    try:
        for filename in ("config.json", "model.safetensors"):
            path = hub.hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
        raise CheckpointError(
            f"{name} is not in the Hugging Face cache ({cache or 'the default, ~/.cache/huggingface/hub'}) "
            f"and {why}: run `hf download {repo} config.json model.safetensors` on a machine with internet "
            f"and copy the cache here (point HF_HOME at it), or pass a local HF folder path"
        ) from None
    except OSError as e:  # HTTP errors (private proxy, rate limit, ...) are OSErrors too
        raise CheckpointError(f"could not download {repo}: {str(e).splitlines()[0][:160]}") from None
    return Path(path).parent


def gpt_config(hf: dict[str, Any], source: str) -> GPTConfig:
    """An HF GPT-2 config.json (as a dict) -> our GPTConfig; refuses what our GPT cannot run."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{source} is a {hf.get('model_type')!r} model, not GPT-2 (model_type 'gpt2')")
    for key, allowed in HF_FIXED.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{source}: config.json has {key}={hf[key]!r}; nanogpt needs {allowed[0]}")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise CheckpointError(f"{source}: config.json has n_inner={n_inner}, nanogpt's MLP is 4 * n_embd")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{source}: config.json has layer_norm_epsilon={eps}, nanogpt needs 1e-5")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)


def _apply_overrides(cfg: GPTConfig, overrides: dict[str, Any], source: str) -> int:
    """Set dropout; return the block_size to crop to; refuse any other difference."""
    known = {f.name for f in fields(GPTConfig)}
    crop_to = cfg.block_size
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown model setting {key!r}; GPTConfig has {', '.join(sorted(known))}")
        have = getattr(cfg, key)
        if key == "dropout":
            cfg.dropout = value
        elif key == "block_size" and value <= have:
            crop_to = value
        elif value != have:
            shape = (cfg.n_layer, cfg.n_head, cfg.n_embd)
            name = next((n for n, s in PRETRAINED.items() if s == shape), None)
            raise ConfigError(
                f"{source} has {key}={have} but {value} was asked for: only dropout and a smaller block_size "
                f"can differ from a pretrained model (set model.{key}={have}"
                + (f", or pick model={name})" if name else ")")
            )
    return crop_to


def _weight_files(folder: Path, source: str) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json lists."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in _read_json(index, source)["weight_map"].values()})
    raise CheckpointError(
        f"{folder} has no model.safetensors: export it in safetensors format "
        f"(save_pretrained(folder, safe_serialization=True) or nanogpt-export)"
    )


def _read_weights(
    model: GPT, files: list[Path], source: str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Read every tensor our model needs, one at a time, checking names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state: dict[str, torch.Tensor] = {}
    head: torch.Tensor | None = None
    buffer = torch.empty(tensorfile.CHUNK_BYTES, dtype=torch.uint8)  # reused for every transpose
    for file in files:
        with open(file, "rb", buffering=0) as f:
            header, base = tensorfile.read_header(f)
            for hf_key, entry in header.items():
                key = _our_key(hf_key)
                if key.endswith(IGNORED):
                    continue
                conv1d = key.endswith(CONV1D)
                shape = tuple(entry["shape"])[::-1] if conv1d else tuple(entry["shape"])
                if key != "lm_head.weight":
                    _check_shape(hf_key, shape, expected.get(key), conv1d, source)
                out = torch.empty(shape, dtype=dtype or torch.float32)
                tensorfile.read_into(f, base, hf_key, entry, out, transpose=conv1d, buffer=buffer)
                if key == "lm_head.weight":
                    head = out
                else:
                    state[key] = out
    missing = sorted(expected.keys() - state.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source}: tensor {_hf_key(missing[0])} is missing{more}; the folder is incomplete, "
            f"re-download or re-export it"
        )
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; nanogpt's GPT-2 ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _check_shape(hf_key: str, shape: tuple, want: tuple | None, conv1d: bool, source: str) -> None:
    if want is None:
        raise CheckpointError(f"{source}: unexpected tensor {hf_key!r}; is this a GPT-2 checkpoint?")
    if shape != want:
        have, want = (shape[::-1], want[::-1]) if conv1d else (shape, want)  # in the file's layout
        raise CheckpointError(
            f"{source}: tensor {hf_key} has shape {have}, config.json implies {want}; "
            f"the weights and config.json do not match, re-download or re-export the folder"
        )


def _our_key(hf_key: str) -> str:
    """HF key (with or without the `transformer.` prefix) -> ours."""
    base = hf_key.removeprefix("transformer.")
    return base if base == "lm_head.weight" else f"transformer.{base}"


def _hf_key(key: str) -> str:
    return key.removeprefix("transformer.")


# ---- export ------------------------------------------------------------------------------------


def export_hf(
    source: torch.nn.Module | str | Path,
    out_dir: str | Path,
    *,
    data_meta: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    prefer: str = BEST,
) -> Path:
    """Write a GPT (or a checkpoint file / training out_dir) as an HF GPT-2 folder.

    The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(out_dir)`. With GPT-2's
    vocabulary (from data_meta, else a vocab_size of 50257 or the padded 50304) the embedding is cut
    back to 50257 rows and the tokenizer files are added, so `pipeline("text-generation")` works.
    """
    if isinstance(source, (str, Path)):
        payload = load_checkpoint(source, prefer)
        known = {f.name for f in fields(GPTConfig)}
        cfg = GPTConfig(**{k: v for k, v in payload["model_config"].items() if k in known})
        state, data_meta = payload["model"], data_meta or payload.get("data_meta")
    else:
        model = unwrap(source)
        cfg, state = model.config, clean_state_dict(model.state_dict())
    gpt2 = _uses_gpt2_vocab(cfg.vocab_size, data_meta)
    vocab = GPT2_VOCAB if gpt2 else cfg.vocab_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(state, vocab)
    tensorfile.save(out / "model.safetensors", tensors, dtype, metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(cfg, vocab, gpt2, dtype))
    if gpt2:
        _write_tokenizer(out, cfg.block_size)
    else:
        log.info("vocabulary of %d tokens is not GPT-2's: exported weights and config, no tokenizer", vocab)
    log.info("exported %s (%d tensors)", out, len(tensors))
    return out


def hf_state_dict(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GPT2LMHeadModel's, as views (nothing is copied): Conv1D transposes, zero
    biases for bias=False models, the embedding cut to `vocab` rows, lm_head left out (tied)."""
    out = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            continue
        if key == "transformer.wte.weight":
            t = t[:vocab]
        if key.endswith(CONV1D):
            t = t.t()
        out[key] = t.detach()
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".weight") and key.split(".")[1] not in ("wte", "wpe") and bias not in state:
            out[bias] = torch.zeros(t.shape[-1] if key.endswith(CONV1D) else t.shape[0])
    return out


def hf_config(cfg: GPTConfig, vocab: int, gpt2: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the equivalent GPT2LMHeadModel."""
    eot = EOT if gpt2 else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _uses_gpt2_vocab(vocab_size: int, data_meta: dict[str, Any] | None) -> bool:
    if data_meta and data_meta.get("tokenizer"):
        return data_meta["tokenizer"] == "gpt2" and vocab_size >= GPT2_VOCAB
    return vocab_size in (GPT2_VOCAB, 50304)  # 50304: GPT-2's padded to a multiple of 64


def _write_tokenizer(out: Path, block_size: int) -> None:
    """GPT-2's BPE files under HF's names, plus the config that says how to use them."""
    from nanogpt.data.download import fetch

    fetch("gpt2_bpe/encoder.json", f"{BPE_BASE}/encoder.json", out / "vocab.json")
    fetch("gpt2_bpe/vocab.bpe", f"{BPE_BASE}/vocab.bpe", out / "merges.txt")
    eot = "<|endoftext|>"
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
        "bos_token": eot, "eos_token": eot, "unk_token": eot,
    })


# ---- helpers -----------------------------------------------------------------------------------


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"{module} is not installed: pip install 'nanogpt[hf]'") from None


def _read_json(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{source}: {path.name} is missing; an HF GPT-2 folder has config.json and model.safetensors"
        )
    return json.loads(path.read_text())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
