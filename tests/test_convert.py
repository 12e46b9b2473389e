"""HF GPT-2 <-> our params: logits parity with transformers (the oracle), export, the offline Hub
cache, one-line errors, sharded placement. The oracle is a GPT2LMHeadModel built locally from a
random GPT2Config with every weight randomised (biases and LayerNorms too), never downloaded."""

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt_jax import convert, hf_files
from nanogpt_jax.convert import export_hf, hf_to_gpt_config, load_pretrained
from nanogpt_jax.errors import CheckpointError, ConfigError
from nanogpt_jax.model import GPT, PADDED_VOCAB_SIZE, GPTConfig, init_params

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=97)
IDX = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(2, 16), dtype=np.int32)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    with torch.no_grad():  # random everything, so a misplaced bias or LayerNorm cannot hide
        for name, p in model.named_parameters():
            layer_norm_scale = ".ln_" in name and name.endswith(".weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if layer_norm_scale else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_logits(hf_model):
    with torch.no_grad():
        return hf_model(torch.from_numpy(IDX).long()).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    """transformers' own save: config.json + model.safetensors, keys `transformer.*`, lm_head left out."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def hf_bin_dir(hf_model, hf_dir, tmp_path_factory):
    """An old-style pytorch_model.bin (transformers 5 always saves safetensors, so torch.save it):
    keys without the `transformer.` prefix, the causal-mask buffers, and the tied lm_head."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2-bin"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
    n = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in state
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@functools.lru_cache
def _forward(config: GPTConfig):
    return jax.jit(lambda params, idx: GPT(config).apply({"params": params}, idx))


def assert_logits_match(model, params, hf_logits, atol=1e-5):
    """The parity check: our logits equal transformers' (fp32)."""
    T = min(model.config.block_size, IDX.shape[1])
    ours = np.asarray(_forward(model.config)(params, IDX[:, :T]))
    np.testing.assert_allclose(ours, hf_logits[:, :T], atol=atol, rtol=0)


# ---- import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_equal_transformers(fmt, scan, hf_dir, hf_bin_dir, hf_logits):
    model, params = load_pretrained(hf_dir if fmt == "safetensors" else hf_bin_dir, scan_layers=scan)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 32, 16, 97)
    assert c.scan_layers == scan and c.dropout == 0.0
    assert ("h" in params) == scan and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(model, jax.random.key(0)))
    assert_logits_match(model, params, hf_logits)


def test_a_transposed_attn_c_proj_fails_the_parity_check(hf_dir, hf_logits, monkeypatch):
    # The (D, D) matrix is square, so a transpose keeps every shape right: only the values catch it.
    right = convert._from_hf

    def transposed(hf_key, x, shape):
        return right(hf_key, x.T if hf_key.endswith("attn.c_proj.weight") else x, shape)

    monkeypatch.setattr(convert, "_from_hf", transposed)
    model, params = load_pretrained(hf_dir)
    with pytest.raises(AssertionError):
        assert_logits_match(model, params, hf_logits)


def test_block_size_crops_position_embeddings(hf_dir, hf_logits):
    model, params = load_pretrained(hf_dir, block_size=8, dtype="float32", dropout=0.1, remat="full")
    assert model.config.block_size == 8 and model.config.dropout == 0.1
    assert params["wpe"]["embedding"].shape == (8, 32)
    assert_logits_match(model, params, hf_logits)


def test_param_dtype_casts_on_read(hf_dir):
    _, params = load_pretrained(hf_dir, param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def _fsdp_shardings(params, mesh):
    """Split each leaf's last axis over the 8 devices where it divides, else replicate."""
    def spec(x):
        last = "fsdp" if x.shape[-1] % mesh.size == 0 else None
        return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), last))
    return jax.tree.map(spec, params)


@pytest.mark.parametrize("scan", [False, True])
def test_shardings_place_each_tensor(scan, hf_dir):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    model, reference = load_pretrained(hf_dir, scan_layers=scan)
    shardings = _fsdp_shardings(reference, mesh)
    _, params = load_pretrained(hf_dir, scan_layers=scan, shardings=shardings)
    split = 0
    for x, ref, s in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(shardings), strict=True):
        assert x.sharding == s and len(x.devices()) == 8
        split += s.spec[-1] == "fsdp"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    assert split > 10  # most leaves really are split, not just replicated
    with pytest.raises(ValueError, match="structure of the params"):
        load_pretrained(hf_dir, scan_layers=not scan, shardings=shardings)


# ---- the Hub, offline ---------------------------------------------------------------------------


def _fake_hub_cache(home: Path, repo_folder: str, source: Path, files: list[str]) -> None:
    """The layout huggingface_hub leaves behind: hub/models--<id>/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / repo_folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    for name in files:
        shutil.copy(source / name, repo / "snapshots" / rev / name)


@pytest.mark.parametrize("repo_folder,weights", [
    ("models--gpt2", "model.safetensors"),  # transformers' old alias
    ("models--openai-community--gpt2", "model.safetensors"),
    ("models--gpt2", "pytorch_model.bin"),  # an old cache without safetensors
])
def test_named_model_from_offline_hub_cache(repo_folder, weights, hf_dir, hf_bin_dir, hf_logits, tmp_path,
                                            monkeypatch):
    source = hf_dir if weights == "model.safetensors" else hf_bin_dir
    _fake_hub_cache(tmp_path / "hf", repo_folder, source, ["config.json", weights])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model, params = load_pretrained("gpt2", scan_layers=True)
    assert_logits_match(model, params, hf_logits)

    with pytest.raises(CheckpointError) as e:  # cached under gpt2 only: gpt2-medium is not there
        load_pretrained("gpt2-medium")
    message = str(e.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "HF_HOME" in message and "folder" in message and str(tmp_path / "hf" / "hub") in message


def test_unknown_name_says_how_to_point_at_local_weights(tmp_path):
    for name, match in [("gpt3", r"'gpt3' is neither a GPT-2 name .* HF GPT-2 folder"),
                        (str(tmp_path / "no-such-folder"), r"no folder .*no-such-folder: pass an HF GPT-2 folder")]:
        with pytest.raises(CheckpointError, match=match) as e:
            load_pretrained(name)
        assert "\n" not in str(e.value)


def test_download_goes_through_huggingface_hub(hf_dir, hf_bin_dir, hf_logits, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    asked = []

    def fake_download(repo, filename, *, cache_dir):  # a Hub repo that has only pytorch_model.bin
        asked.append((repo, filename, cache_dir))
        if filename == "model.safetensors":
            raise EntryNotFoundError("404: model.safetensors")
        return str(hf_bin_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert_logits_match(*load_pretrained("gpt2"), hf_logits)
    cache = str(tmp_path / "empty-cache" / "hub")
    assert asked == [("openai-community/gpt2", f, cache) for f in ("config.json", "model.safetensors",
                                                                  "pytorch_model.bin")]

    def unreachable(repo, filename, *, cache_dir):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not cached.\nCheck your connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError, match=r"could not download openai-community/gpt2-xl \(Cannot reach") as e:
        load_pretrained("gpt2-xl")
    assert "\n" not in str(e.value) and "HF_HOME" in str(e.value) and "folder path" in str(e.value)


# ---- errors --------------------------------------------------------------------------------------


def _broken_copy(hf_dir: Path, dest: Path, edit) -> Path:
    """hf_dir with its tensors passed through edit(dict) -> dict."""
    dest.mkdir()
    shutil.copy(hf_dir / "config.json", dest)
    save_file(edit(load_file(hf_dir / "model.safetensors")), dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _replace(key, value):
    return lambda t: {**t, key: value}


@pytest.mark.parametrize("edit,match", [
    (_drop("transformer.h.1.mlp.c_fc.bias"), r"tensor h\.1\.mlp\.c_fc\.bias is missing"),
    (_replace("transformer.h.0.attn.c_proj.weight", np.zeros((32, 16), np.float32)),
     r"tensor transformer\.h\.0\.attn\.c_proj\.weight has shape \(32, 16\), config\.json implies \(32, 32\)"),
    (_replace("transformer.h.2.ln_1.weight", np.ones(32, np.float32)), r"unexpected tensor 'transformer\.h\.2"),
    (_replace("lm_head.weight", np.zeros((97, 32), np.float32)), r"lm_head\.weight differs from wte\.weight"),
])
def test_bad_tensors_are_one_line_errors_naming_the_key(edit, match, hf_dir, tmp_path):
    folder = _broken_copy(hf_dir, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_pretrained(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_tied_lm_head_equal_to_wte_is_accepted(hf_dir, hf_logits, tmp_path):
    tie = lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"]}
    folder = _broken_copy(hf_dir, tmp_path / "with-head", tie)
    assert_logits_match(*load_pretrained(folder), hf_logits)


def test_block_size_cannot_grow(hf_dir):
    with pytest.raises(CheckpointError, match=r"block_size=32 exceeds the checkpoint's n_positions=16") as e:
        load_pretrained(hf_dir, block_size=32)
    assert "\n" not in str(e.value)


def test_missing_files_and_torch_less_bin(hf_dir, hf_bin_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(empty)
    shutil.copy(hf_dir / "config.json", empty)
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_pretrained(empty)
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(hf_dir / "config.json")
    monkeypatch.setattr(hf_files, "_torch_available", lambda: False)
    with pytest.raises(CheckpointError, match="torch is not installed"):
        load_pretrained(hf_bin_dir)


GPT2_JSON = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=97,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new")


@pytest.mark.parametrize("change,match", [
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (dict(n_inner=100), "n_inner=100"),
    (dict(model_type="llama"), "model_type='llama'"),
    (dict(n_layer=None), "no integer n_layer"),
    (dict(n_embd=33), "n_embd=33 must be divisible by n_head=2"),
])
def test_hf_config_that_is_not_gpt2_is_refused(change, match):
    with pytest.raises(CheckpointError, match=match):
        hf_to_gpt_config({**GPT2_JSON, **change})


def test_hf_to_gpt_config_overrides():
    c = hf_to_gpt_config(GPT2_JSON, dtype="bfloat16", scan_layers=True, attention="auto", n_layer=2, block_size=8)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias) == (2, 2, 32, 8, 97, True)
    assert (c.dtype, c.scan_layers, c.attention, c.dropout) == ("bfloat16", True, "auto", 0.0)
    assert hf_to_gpt_config({**GPT2_JSON, "activation_function": "gelu_pytorch_tanh"}).n_embd == 32
    with pytest.raises(CheckpointError, match="vocab_size=50304 differs from the checkpoint's vocab_size=97"):
        hf_to_gpt_config(GPT2_JSON, vocab_size=PADDED_VOCAB_SIZE)
    with pytest.raises(ConfigError, match="dtype='float64'"):
        hf_to_gpt_config(GPT2_JSON, dtype="float64")
    with pytest.raises(TypeError, match="unknown GPTConfig field 'n_layers'"):
        hf_to_gpt_config(GPT2_JSON, n_layers=2)


# ---- export --------------------------------------------------------------------------------------


def _transformers_logits(folder: Path, idx: np.ndarray) -> np.ndarray:
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(idx).long()).logits.numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_export_then_transformers_gives_the_same_logits(scan, hf_dir, hf_logits, tmp_path):
    model, params = load_pretrained(hf_dir, scan_layers=scan)
    out = export_hf(model.config, params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_allclose(_transformers_logits(out, IDX), hf_logits, atol=1e-5, rtol=0)
    # and the tensors are bit-identical to the original file (only the layout moved)
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key])
    assert [x.name for x in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind


@pytest.mark.parametrize("bias", [True, False])
def test_export_cuts_a_padded_vocab(bias, tmp_path):
    config = GPTConfig(block_size=16, vocab_size=PADDED_VOCAB_SIZE, n_layer=1, n_head=2, n_embd=32, bias=bias,
                       scan_layers=True)
    rng = np.random.default_rng(1)  # numpy: jax.random would compile once per leaf shape
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (path[-1].key == "scale") + rng.normal(0, 0.1, s.shape).astype(np.float32),
        convert._expected_params(config))
    idx = IDX % 50257
    ours = np.asarray(_forward(config)(params, idx))[..., :50257]
    out = export_hf(config, params, tmp_path / "padded")
    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["vocab_size"] == 50257 and hf_json["eos_token_id"] == 50256
    np.testing.assert_allclose(_transformers_logits(out, idx), ours, atol=1e-5, rtol=0)
    assert load_file(out / "model.safetensors")["transformer.wte.weight"].shape == (50257, 32)
    # and back: an exported folder loads (without biases: zero biases)
    model, loaded = load_pretrained(out)
    assert model.config.vocab_size == 50257 and model.config.bias
    np.testing.assert_allclose(np.asarray(_forward(model.config)(loaded, idx)), ours, atol=1e-5, rtol=0)


def test_export_vocab_size_argument(tmp_path, tiny_config, tiny_params):
    out = export_hf(tiny_config, tiny_params, tmp_path / "cut", vocab_size=65)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 65
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None  # not GPT-2's BPE
    with pytest.raises(CheckpointError, match="vocab_size=98 must be in 1..97"):
        export_hf(tiny_config, tiny_params, tmp_path / "grow", vocab_size=98)


def test_export_refuses_a_non_empty_folder_unless_asked(tmp_path, tiny_config, tiny_params):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty") as e:
        export_hf(tiny_config, tiny_params, out)
    assert "\n" not in str(e.value) and [p.name for p in out.iterdir()] == ["notes.txt"]
    export_hf(tiny_config, tiny_params, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(tiny_config, tiny_params, empty)  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


def test_export_checks_params_against_config(tmp_path, tiny_config, tiny_params):
    with pytest.raises(CheckpointError, match=r"params have no h/attn/c_attn/bias; .* \(scan_layers=True\)"):
        export_hf(dataclasses.replace(tiny_config, scan_layers=True), tiny_params, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"params wpe/embedding has shape \(16, 32\), the config implies"):
        export_hf(dataclasses.replace(tiny_config, block_size=8), tiny_params, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
