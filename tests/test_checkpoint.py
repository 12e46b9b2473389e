import os

import pytest
import torch

from nanogpt.checkpoint import (
    BEST,
    LATEST,
    clean_state_dict,
    find_checkpoint,
    load_checkpoint,
    load_model,
    model_payload,
    save_checkpoint,
    unwrap,
)
from nanogpt.errors import CheckpointError


class Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_model_rebuild(tiny_model, tmp_path):
    path = save_checkpoint(model_payload(tiny_model, iter_num=3), tmp_path / LATEST)
    payload = load_checkpoint(path)
    assert payload["iter_num"] == 3 and payload["format"].startswith("nanogpt-checkpoint")
    model = load_model(tmp_path)  # an out_dir with only ckpt.pt falls back to it
    idx = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model.predict(idx), tiny_model.predict(idx))
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives loading


def test_wrapper_prefixes_are_removed(tiny_model, tmp_path):
    compiled = torch.compile(tiny_model)  # wraps as _orig_mod, compiles only when called
    payload = model_payload(compiled)
    assert not any("_orig_mod" in k for k in payload["model"])
    assert unwrap(compiled) is tiny_model
    assert clean_state_dict({"module._orig_mod.lm_head.weight": 1}) == {"lm_head.weight": 1}


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "model_config": {}, "evil": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_corrupt_truncated_and_missing(tiny_model, tmp_path):
    path = save_checkpoint(model_payload(tiny_model), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a nanogpt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="train first"):
        load_checkpoint(tmp_path / "empty_run")


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    save_checkpoint(model_payload(tiny_model, iter_num=1), tmp_path / LATEST)

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model_payload(tiny_model, iter_num=2), tmp_path / LATEST)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / LATEST)["iter_num"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]  # no temporary file left behind


def test_find_checkpoint_prefers_best(tiny_model, tmp_path):
    for name in (LATEST, BEST):
        save_checkpoint(model_payload(tiny_model), tmp_path / name)
    assert find_checkpoint(tmp_path).name == BEST
    assert find_checkpoint(tmp_path, prefer=LATEST).name == LATEST


def test_mismatched_weights_fail_clearly(tiny_model, tmp_path):
    payload = model_payload(tiny_model)
    payload["model_config"]["n_embd"] = 64
    save_checkpoint(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad.pt")
