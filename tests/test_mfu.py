import pytest
import torch

from nanogpt.mfu import cpu_peak_flops, device_peak, device_peak_flops, gpu_peak, mfu
from nanogpt.model import GPT, GPTConfig


def test_flops_per_token_matches_a_hand_count():
    cfg = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, bias=True)
    C, V, L, T = 32, 97, 2, 16
    per_layer = (
        2 * C  # ln_1 weight and bias
        + C * 3 * C + 3 * C  # c_attn: q, k, v
        + C * C + C  # attention c_proj
        + 2 * C  # ln_2
        + C * 4 * C + 4 * C  # c_fc
        + 4 * C * C + C  # mlp c_proj
    )
    # the token embedding counts once: tied to lm_head, it is the output matmul; wpe is a lookup
    n = V * C + L * per_layer + 2 * C  # + ln_f
    assert n == 28_576
    model = GPT(cfg)
    assert model.num_params(non_embedding=True) == n
    # 6 FLOPs per parameter (forward 2, backward 4) + attention scores and their use: 12 * L * C * T
    assert model.flops_per_token() == 6 * n + 12 * L * C * T == 183_744
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * L * C * 8


def test_mfu_from_known_numbers():
    # 2,000 tokens/s at 1 MFLOP per token = 2 GFLOP/s, on a 10 GFLOP/s device: 20%
    assert mfu(1e6, 2000, 1e10) == pytest.approx(0.2)
    assert mfu(1e6, 2000, None) is None


@pytest.mark.parametrize(
    "name,dtype,label,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "float16", "H100 NVL", 835.5),
        ("NVIDIA GH200 480GB", "bfloat16", "H100 SXM", 989.4),
        ("NVIDIA H200", "bfloat16", "H200 SXM", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "float32", "A100", 19.5),
        ("NVIDIA A10G", "bfloat16", "A10", 125),
        ("NVIDIA A10", "float32", "A10", 31.2),
        ("NVIDIA L4", "bfloat16", "L4", 121),
        ("NVIDIA L40S", "bfloat16", "L40S", 362),
        ("NVIDIA GeForce RTX 4090", "bfloat16", "RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 3090 Ti", "float16", "RTX 3090 Ti", 80),
        ("NVIDIA GeForce RTX 3090", "bfloat16", "RTX 3090", 71),
        ("Tesla V100-SXM2-16GB", "float16", "V100 SXM2", 125),
        ("Tesla V100-PCIE-32GB", "float16", "V100 PCIe", 112),
        ("Tesla T4", "float32", "T4", 8.1),
    ],
)
def test_gpu_names_map_to_datasheet_peaks(name, dtype, label, tflops):
    peak = gpu_peak(name, dtype)
    assert peak.flops == pytest.approx(tflops * 1e12)
    assert peak.source.startswith(label + " datasheet")


def test_tf32_and_missing_entries():
    assert gpu_peak("NVIDIA A100-SXM4-40GB", "float32", tf32=True).flops == pytest.approx(156e12)
    assert gpu_peak("Tesla T4", "bfloat16").flops is None  # Turing has no bf16 tensor cores
    unknown = gpu_peak("Some Future GPU", "bfloat16")
    assert unknown.flops is None and "unknown GPU" in unknown.source


def test_cpu_probe_and_override():
    peak = device_peak("cpu", "float32")
    assert peak.flops > 1e8 and "probe" in peak.source
    assert cpu_peak_flops("float32") == peak.flops  # measured once per process and thread count
    assert device_peak_flops(torch.device("cpu"), "float32", override=5e12) == 5e12
    assert device_peak_flops("meta", "float32") is None
