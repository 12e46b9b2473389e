"""Batches: a pure function of (seed, step), split over processes by the sharding, prefetched by a
thread; fixed evaluation batches and sliding windows that score every token once."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, free_port
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_data import bad, make_dir

from nanogpt_jax import batches, data


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return make_dir(tmp_path / "d", rng.integers(0, 50257, 5000), rng.integers(0, 50257, 700))


def sequential(n: int) -> np.ndarray:
    """Token i is i (mod 60000): a window's values tell where it starts."""
    return (np.arange(n) % 60000).astype(np.uint16)


# ---- training batches ---------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step(folder):
    tokens = data.open_split(folder, "train")
    b = batches.TrainBatches(tokens, batch_size=4, block_size=16, grad_accum=3, seed=7)
    x, y = b.batch(5)
    assert x.shape == y.shape == (3, 4, 16) and x.dtype == y.dtype == np.int32
    again = batches.TrainBatches(np.asarray(tokens), batch_size=4, block_size=16, grad_accum=3, seed=7)
    np.testing.assert_array_equal(again.batch(5)[0], x)  # a fresh object, in-memory tokens: the same batch
    assert not np.array_equal(b.batch(6)[0], x)  # another step
    assert not np.array_equal(batches.TrainBatches(tokens, batch_size=4, block_size=16, grad_accum=3,
                                                   seed=8).batch(5)[0], x)  # another seed
    np.testing.assert_array_equal(b.local(5)[0], x)  # no sharding: this process holds everything


def test_y_is_x_shifted_by_one():
    tokens = sequential(10_000)
    b = batches.TrainBatches(tokens, batch_size=5, block_size=32, grad_accum=2, seed=1)
    x, y = b.batch(3)
    starts = b.offsets(3)
    np.testing.assert_array_equal(x, tokens[starts[..., None] + np.arange(32)])
    np.testing.assert_array_equal(y, tokens[starts[..., None] + np.arange(1, 33)])
    assert starts.max() <= 10_000 - 33  # the last window ends at the last token


class FakeSharding:
    """Rows of a (A, 12, T) batch split over 4 devices of 3 rows; this process holds the devices in
    `mine`. Only what TrainBatches uses: shard_shape and addressable_devices_indices_map."""

    def __init__(self, mine: list[int]):
        self.mine = mine

    def shard_shape(self, shape):
        return (shape[0], shape[1] // 4, shape[2])

    def addressable_devices_indices_map(self, shape):
        rows = shape[1] // 4
        return {f"dev{d}": (slice(None), slice(d * rows, (d + 1) * rows), slice(None)) for d in self.mine}


def test_two_processes_hold_disjoint_rows_whose_union_is_the_global_batch():
    tokens = sequential(50_000)
    one = batches.TrainBatches(tokens, batch_size=12, block_size=16, grad_accum=2, seed=3)
    procs = [batches.TrainBatches(tokens, batch_size=12, block_size=16, grad_accum=2, seed=3, sharding=FakeSharding(m))
             for m in ([2, 0], [3, 1])]  # interleaved devices: process 0 holds rows 0-2 and 6-8
    rows = [p.indices[1] for p in procs]
    assert rows[0].tolist() == [0, 1, 2, 6, 7, 8] and rows[1].tolist() == [3, 4, 5, 9, 10, 11]
    for step in (0, 17):
        x, y = one.batch(step)
        union_x, union_y = np.zeros_like(x), np.zeros_like(y)
        for p, r in zip(procs, rows, strict=True):
            px, py = p.local(step)
            assert px.shape == (2, 6, 16)
            union_x[:, r], union_y[:, r] = px, py
        np.testing.assert_array_equal(union_x, x)
        np.testing.assert_array_equal(union_y, y)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_global_batch_on_an_8_device_mesh(mesh):
    tokens = sequential(20_000)
    for spec, m in ((P(None, "data", None), mesh),
                    (P(None, ("data", "fsdp"), None),
                     jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2))):
        sharding = NamedSharding(m, spec)
        b = batches.TrainBatches(tokens, batch_size=16, block_size=8, grad_accum=2, seed=0, sharding=sharding)
        x, y = b.global_(4)
        assert x.shape == (2, 16, 8) and x.dtype == np.int32 and x.sharding == sharding
        assert {s.data.shape for s in x.addressable_shards} == {(2, 2, 8)}
        np.testing.assert_array_equal(np.asarray(x), b.batch(4)[0])
        np.testing.assert_array_equal(np.asarray(y), b.batch(4)[1])
    bad(lambda: batches.TrainBatches(tokens, batch_size=12, block_size=8,
                                     sharding=NamedSharding(mesh, P(None, "data"))),
        r"does not divide evenly .*multiple of the devices")


MULTIHOST = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from nanogpt_jax import batches
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
b = batches.TrainBatches((np.arange(20000) % 60000).astype(np.uint16), batch_size=16, block_size=8, grad_accum=2,
                         seed=0, sharding=NamedSharding(mesh, P(None, "data", None)))
x, y = b.global_(3)
one_process = b.batch(3)  # all 16 rows, as a single process would draw them
for arr, full in zip((x, y), one_process):
    assert arr.shape == (2, 16, 8)
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
print(jax.process_count(), len(jax.devices()), b.indices[1].tolist(), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_real_processes_build_the_one_process_batch(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(i), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [o.strip() for o, _ in outs] == ["2 8 [0, 1, 2, 3, 4, 5, 6, 7]", "2 8 [8, 9, 10, 11, 12, 13, 14, 15]"]


def test_batch_arguments_are_checked():
    bad(lambda: batches.TrainBatches(sequential(16), batch_size=2, block_size=16),
        "16 tokens, not more than block_size=16")
    bad(lambda: batches.TrainBatches(sequential(99), batch_size=0, block_size=16), "batch_size=0")


# ---- prefetch ------------------------------------------------------------------------------------


def test_prefetch_yields_the_global_batches_in_order(mesh):
    b = batches.TrainBatches(sequential(5000), batch_size=8, block_size=8, grad_accum=1, seed=2,
                             sharding=NamedSharding(mesh, P(None, "data", None)))
    got = list(b.prefetch(10, 14))
    assert [s for s, _, _ in got] == [10, 11, 12, 13]
    for step, x, y in got:
        assert isinstance(x, jax.Array)
        np.testing.assert_array_equal(np.asarray(x), b.batch(step)[0])
        np.testing.assert_array_equal(np.asarray(y), b.batch(step)[1])


def test_prefetch_stops_cleanly_and_passes_errors_on():
    b = batches.TrainBatches(sequential(5000), batch_size=2, block_size=8, seed=2)
    with b.prefetch(0) as it:  # endless
        assert [next(it)[0] for _ in range(3)] == [0, 1, 2]
    assert not it._thread.is_alive() and list(it) == []

    def make(step):
        if step == 2:
            raise ValueError("disk on fire")
        return (step,)

    it = batches.Prefetcher(make, range(5))
    assert next(it) == (0, 0) and next(it) == (1, 1)
    with pytest.raises(ValueError, match="disk on fire"):
        next(it)
    assert not it._thread.is_alive()


def test_an_abandoned_prefetcher_does_not_hang_exit():
    code = ("import numpy as np; from nanogpt_jax import batches\n"
            "b = batches.TrainBatches(np.arange(10000, dtype=np.uint16), batch_size=4, block_size=8)\n"
            "it = b.prefetch(0); next(it); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---- evaluation ----------------------------------------------------------------------------------


def test_eval_batches_are_fixed():
    tokens = sequential(30_000)
    first = batches.eval_batches(tokens, batch_size=4, block_size=16, n_batches=3, seed=1)
    again = batches.eval_batches(tokens, batch_size=4, block_size=16, n_batches=3, seed=1)
    assert len(first) == 3 and all(x.shape == (4, 16) and x.dtype == np.int32 for x, _ in first)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    train = batches.TrainBatches(tokens, batch_size=4, block_size=16, seed=1).batch(0)[0][0]
    assert not np.array_equal(first[0][0], train)  # not the training windows


@pytest.mark.parametrize("n,block,stride,batch", [(1000, 64, 64, 4), (1000, 64, 17, 3), (1000, 64, 1, 50),
                                                  (30, 64, 32, 2), (65, 64, 64, 1), (66, 64, 64, 1)])
def test_sliding_windows_score_every_token_once(n, block, stride, batch):
    tokens = np.arange(n, dtype=np.uint16)  # y's value is its position in the split
    scored = []
    for x, y, mask in batches.sliding_windows(tokens, block_size=block, stride=stride, batch_size=batch):
        assert x.shape == y.shape == mask.shape == (batch, block) and mask.dtype == np.float32
        for row_x, row_y, row_m in zip(x, y, mask, strict=True):
            cols = np.flatnonzero(row_m)
            np.testing.assert_array_equal(row_x[cols], row_y[cols] - 1)
            # each scored token sees the whole prefix, or at least block - stride + 1 tokens
            assert all(c + 1 >= min(int(row_y[c]), block - stride + 1) for c in cols)
            scored += row_y[cols].tolist()
            if not cols.size:
                assert not row_x.any() and not row_y.any()  # padding rows
    assert sorted(scored) == list(range(1, n)) and len(scored) == n - 1


def test_sliding_windows_bad_stride():
    bad(lambda: next(batches.sliding_windows(sequential(100), block_size=8, stride=9, batch_size=2)),
        "stride=9 must lie in 1 .. block_size=8")
