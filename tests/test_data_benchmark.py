import pytest

from nanogpt.data.benchmark import bench_loader, bench_prepare, synthetic_text


def test_synthetic_text_is_seeded_and_sized():
    text = synthetic_text(0.05)
    assert text == synthetic_text(0.05) and 30_000 < len(text) < 80_000


@pytest.mark.slow  # a fresh process that imports torch
def test_bench_prepare_reports_throughput_and_memory():
    r = bench_prepare(0.2, "text", num_proc=2)
    assert r["tokens"] > 20_000 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 10
    assert set(r) >= {"seconds", "mb_per_s", "peak_rss_workers_mb", "num_proc", "tokenizer", "corpus_mb"}


def test_bench_loader_reports_batches_per_second():
    for sampler in ("random", "epoch"):
        r = bench_loader(tokens=50_000, batch_size=4, block_size=64, sampler=sampler, iters=10)
        assert r["sampler"] == sampler and r["batches_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batches_per_s"] * 4 * 64)
