"""nanogpt.tensorfile reads what safetensors writes and writes what safetensors reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanogpt import tensorfile
from nanogpt.errors import CheckpointError


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_read_into_transposes_and_casts(tmp_path, stored):
    w, b = torch.randn(7, 5).to(stored), torch.randn(5).to(stored)
    save_file({"w": w, "b": b, "s": torch.tensor(1.0)}, str(tmp_path / "x.safetensors"))
    buffer = torch.empty(64, dtype=torch.uint8)  # smaller than w: several blocks of rows
    with open(tmp_path / "x.safetensors", "rb", buffering=0) as f:
        header, base = tensorfile.read_header(f)
        assert header["w"]["shape"] == [7, 5]
        wt = tensorfile.read_into(f, base, "w", header["w"], torch.empty(5, 7), transpose=True, buffer=buffer)
        same = tensorfile.read_into(f, base, "b", header["b"], torch.empty(5, dtype=stored))
    assert torch.equal(wt, w.float().t()) and torch.equal(same, b)


def test_save_writes_views_that_safetensors_reads(tmp_path):
    w = torch.randn(300, 40)
    tensors = {"t": w.t(), "rows": w[:7], "vec": torch.arange(5.0), "scalar": torch.tensor(2.0)}
    tensorfile.save(tmp_path / "y.safetensors", tensors, torch.bfloat16, metadata={"format": "pt"})
    back = load_file(tmp_path / "y.safetensors")
    for name, t in tensors.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t.to(torch.bfloat16)), name


def test_truncated_file_is_reported(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "z.safetensors"))
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "z.safetensors").write_bytes(data[:-100])
    with open(tmp_path / "z.safetensors", "rb", buffering=0) as f:
        header, base = tensorfile.read_header(f)
        with pytest.raises(CheckpointError, match="tensor w is truncated"):
            tensorfile.read_into(f, base, "w", header["w"], torch.empty(64, 64))
