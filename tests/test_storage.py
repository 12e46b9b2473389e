"""gs:// paths everywhere, against a real Cloud Storage API on localhost (the `gcs_server` fixture).

A tiny run with out_dir and data_dir in a bucket, killed with SIGKILL and resumed, ends where an
uninterrupted local run ends, bit for bit; its checkpoints, logs and TensorBoard events are read
back from the bucket; run_sample.py and run_eval.py read the run there; 2 processes x 4 devices
share one bucket out_dir. Bad input is one line. A data copy cut short resumes and is checked.
"""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from conftest import ROOT, cli_env, free_port, tiny_run_config

from nanogpt_jax import loggers, prepare, runlock, storage
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import DataError, UserError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.train import train


def upload_data(token_data, url: str) -> str:
    """token_data's files into the bucket, with the sha256s data_prep records."""
    meta = json.loads((token_data / "meta.json").read_text())
    for split in ("train", "val"):
        meta["splits"][split]["sha256"] = storage.sha256_file(token_data / f"{split}.bin")
        storage.upload(token_data / f"{split}.bin", f"{url}/{split}.bin")
    storage.write_atomic(f"{url}/meta.json", json.dumps(meta))
    return url


def objects(server, url: str) -> list[str]:
    """The object names under `url`, asked of the server directly (no client cache in between)."""
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    with urllib.request.urlopen(f"{server.url}/storage/v1/b/{bucket}/o?prefix={prefix}") as r:
        return [o["name"] for o in json.load(r).get("items", [])]


def params_at(out_dir, step: int):
    with Checkpointer(checkpoint_dir(out_dir), read_only=True) as ckpt:
        model = GPT(GPTConfig(**ckpt.record(step)["model"]))
        abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        params, _ = ckpt.restore_params(abstract, step)
    return jax.tree.map(np.asarray, params)


def launch(data_dir, out_dir, cache_dir, n_processes: int = 1, **overrides) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for i in range(n_processes):
        items = {"data.data_dir": data_dir, "out_dir": out_dir, "data.cache_dir": cache_dir, **overrides}
        if n_processes > 1:
            items.update({"dist.coordinator_address": f"localhost:{port}", "dist.num_processes": n_processes,
                          "dist.process_id": i})
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
             *[f"--config.{k}={v}" for k, v in items.items()]],
            cwd=ROOT, env=cli_env(8 // n_processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for_commit(server, out: str, proc: subprocess.Popen, step: int, timeout: float = 240.0) -> None:
    """Until checkpoint `step` of the run `proc` writes to `out` is committed in the bucket; the run must
    still be going then."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(n.endswith(f"checkpoints/{step}/commit_success.txt") for n in objects(server, out)):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        what = "ended" if proc.returncode is not None else f"was still going after {timeout:.0f} s"
        output = proc.communicate(timeout=60)[0]
        pytest.fail(f"the run {what} before checkpoint {step} was committed:\n{output[-3000:]}")


N_STEPS = 30
COMMON = {"train.always_save_checkpoint": True}


@pytest.mark.slow
def test_a_bucket_run_killed_and_resumed_ends_as_a_local_run_and_is_read_from_the_bucket(
        gcs_server, token_data, tmp_path, monkeypatch):
    bucket = gcs_server()
    data_url = upload_data(token_data, f"{bucket}/data/tokens")
    out, cache = f"{bucket}/runs/tiny", tmp_path / "cache"
    proc = launch(data_url, out, cache, **{"train.max_iters": 100_000, **COMMON})[0]
    try:
        wait_for_commit(gcs_server, out, proc, step=10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    with Checkpointer(checkpoint_dir(out), read_only=True) as ckpt:
        killed_at = ckpt.latest_step()
    assert killed_at >= 10, killed_at
    # the uninterrupted local run, now that the kill's step is known: on past it by two evaluations
    n_steps = max(N_STEPS, killed_at + 20)
    ref = tmp_path / "local"
    train(tiny_run_config(token_data, ref, **{"train.max_iters": n_steps, **COMMON}))
    assert (storage.cache_folder(data_url, cache) / "train.bin").read_bytes() == (token_data / "train.bin").read_bytes()

    assert storage.path(f"{out}/run.lock").exists()  # the killed run's lock: it goes stale, and is taken over
    monkeypatch.setattr(runlock, "STALE_S", 3.0)  # (not after the default 120 s)
    summary = train(tiny_run_config(data_url, out, init_from="resume",
                                    **{"train.max_iters": n_steps, "data.cache_dir": str(cache), **COMMON}))
    assert summary["iterations"] == n_steps
    # bit-identical to the uninterrupted local run
    got, want = params_at(out, n_steps), params_at(ref, n_steps)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    # the logs, in the bucket: every step once, the same losses; summary, curve, TensorBoard events
    names = objects(gcs_server, out)
    assert {"runs/tiny/metrics.csv", "runs/tiny/summary.json", "runs/tiny/loss.png"} <= set(names)
    assert "runs/tiny/run.lock" not in names  # released by the run that ended
    assert any(n.startswith("runs/tiny/tb/events.out.tfevents") for n in names)
    m, r = loggers.read_metrics(f"{out}/metrics.csv"), loggers.read_metrics(ref / "metrics.csv")
    assert m["step"] == r["step"], (killed_at, m["step"])
    assert m["train/loss"] == r["train/loss"] and m["val/loss"] == r["val/loss"]
    assert json.loads(storage.path(f"{out}/summary.json").read_text())["iterations"] == n_steps
    assert storage.path(f"{out}/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{out}/tb")  # tensorboard's own reader, on the bucket
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == list(range(0, n_steps + 1, 10))

    # run_sample.py and run_eval.py read the run from the bucket (side by side: two cores)
    common = ["--config", str(ROOT / "configs/tiny.py"), "--config.init_from=resume", f"--config.out_dir={out}",
              f"--config.data.data_dir={data_url}", f"--config.data.cache_dir={cache}"]
    sample = subprocess.Popen([sys.executable, str(ROOT / "run_sample.py"), *common, "--config.sample.prompt=AB",
                               "--config.sample.max_new_tokens=8"], cwd=ROOT, env=cli_env(1), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    evaluate = subprocess.Popen([sys.executable, str(ROOT / "run_eval.py"), *common, "--config.eval.tasks=('loss',)"],
                                cwd=ROOT, env=cli_env(1), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (s_out, s_err), (e_out, e_err) = sample.communicate(timeout=300), evaluate.communicate(timeout=300)
    assert sample.returncode == 0, s_err[-3000:]
    assert s_out.startswith("AB") and len(s_out.strip()) >= 8, s_out
    assert evaluate.returncode == 0, e_err[-3000:]
    assert "loss/val" in e_out  # the table; the report is in the bucket:
    report = json.loads(storage.path(f"{out}/eval.json").read_text())
    assert report["model"]["step"] == n_steps and report["tasks"]["loss/val"]["loss"] > 0


def delete_bucket(server, bucket: str) -> None:
    """Empty and delete `bucket` while a run writes to it (repeated until the bucket itself is gone)."""
    name = bucket.removeprefix("gs://")
    for _ in range(200):
        for obj in objects(server, bucket):
            try:
                urllib.request.urlopen(urllib.request.Request(
                    f"{server.url}/storage/v1/b/{name}/o/{urllib.parse.quote(obj, safe='')}", method="DELETE"))
            except urllib.error.HTTPError:  # deleted meanwhile
                pass
        try:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/storage/v1/b/{name}", method="DELETE"))
            return
        except urllib.error.HTTPError:  # 412: an object was written meanwhile
            time.sleep(0.01)
    raise AssertionError(f"could not delete {bucket}")


@pytest.mark.slow
def test_a_save_into_a_bucket_that_is_gone_is_one_line(gcs_server, token_data, tmp_path):
    """The bucket deleted once checkpoint 10 is committed: the save of step 20 fails (404) and the run
    ends with our line naming the bucket and the credentials, after at most the upload warnings; no
    traceback (tensorstore reported dozens of 'Event loop is closed' as unraisable, before the line)."""
    bucket = gcs_server()
    out = f"{bucket}/run"
    proc = launch(token_data, out, tmp_path / "cache", **{"train.max_iters": 100_000, **COMMON})[0]
    try:
        wait_for_commit(gcs_server, out, proc, step=10)
        deleted = time.time()
        delete_bucket(gcs_server, bucket)
        output = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    seconds = time.time() - deleted
    lines = output.strip().splitlines()
    assert proc.returncode == 1, output[-3000:]
    assert re.fullmatch(rf"error: saving checkpoint step \d+ to {out}/checkpoints failed \(.*\); check the bucket "
                        r"and this machine's credentials .*roles/storage.objectAdmin.*", lines[-1]), lines[-1]
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
    noise = [line for line in lines[:-1] if not re.match(r"I\d{4} ", line) and "| train " not in line]
    assert len(noise) <= 4 and all("uploading" in line for line in noise), noise  # a warning per log upload
    print(f"bucket deleted: exit 1 after {seconds:.1f} s, {len(noise)} warnings before the line")


@pytest.mark.slow
def test_two_processes_share_a_bucket_out_dir(gcs_server, token_data, tmp_path):
    """2 processes x 4 devices: each copies the data once into one cache (they take turns), each writes
    its own shards of the checkpoint, process 0 the logs."""
    bucket = gcs_server()
    data_url = upload_data(token_data, f"{bucket}/data")
    out = f"{bucket}/run"
    procs = launch(data_url, out, tmp_path / "cache", n_processes=2,
                   **{"train.max_iters": 4, "train.eval_interval": 4, "train.log_interval": 1, "model.dtype": "auto"})
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, output) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{output[-3000:]}"
    names = objects(gcs_server, out)
    assert {"run/checkpoints/4/state/ocdbt.process_0/manifest.ocdbt",
            "run/checkpoints/4/state/ocdbt.process_1/manifest.ocdbt"} <= set(names)
    assert sorted(set(loggers.read_metrics(out)["step"])) == [0, 1, 2, 3, 4]
    assert "| loss " in outputs[0] and "| loss " not in outputs[1]  # process 0 logs
    params_at(out, 4)  # restores


# ---- data in a bucket: the local copy -----------------------------------------------------------


def test_a_data_copy_is_resumed_checked_and_reused(gcs_server, token_data, tmp_path, monkeypatch):
    url = upload_data(token_data, f"{gcs_server()}/d")
    cache = tmp_path / "cache"
    local = storage.cache_folder(url, cache)
    want = (token_data / "train.bin").read_bytes()
    # a copy cut short by a kill: the part already there is kept and the rest appended
    local.mkdir(parents=True)
    (local / "train.bin.partial").write_bytes(want[:1000])
    assert storage.local_data_dir(url, cache) == local
    assert (local / "train.bin").read_bytes() == want and not (local / "train.bin.partial").exists()
    # a valid copy is not copied again
    monkeypatch.setattr(storage, "_download", lambda *a: pytest.fail("copied again"))
    storage.local_data_dir(url, cache)
    monkeypatch.undo()
    # a damaged partial copy (garbage of the right size) is caught by the sha256 and copied again
    (local / "val.bin").unlink()
    (local / "val.bin.sha256").unlink()
    (local / "val.bin.partial").write_bytes(b"\0" * (token_data / "val.bin").stat().st_size)
    storage.local_data_dir(url, cache)
    assert (local / "val.bin").read_bytes() == (token_data / "val.bin").read_bytes()


def test_data_prep_uploads_to_a_bucket(gcs_server, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("hello world, a small corpus of text. " * 200)
    url = f"{gcs_server()}/data/t"
    meta = prepare.text([str(text)], url, tokenizer="char")
    remote = json.loads(storage.path(f"{url}/meta.json").read_text())
    assert remote == meta and len(remote["splits"]["train"]["sha256"]) == 64
    local = storage.cache_folder(url, tmp_path / "cache")
    assert storage.path(f"{url}/train.bin").read_bytes() == (local / "train.bin").read_bytes()
    assert storage.local_data_dir(url, tmp_path / "cache") == local  # this host's copy is already valid


# ---- bad input: one line ------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_an_out_dir_in_a_bucket_that_does_not_exist(gcs_server, token_data, tmp_path):
    gcs_server()
    with pytest.raises(UserError) as e:
        train(tiny_run_config(token_data, "gs://no-such-bucket/run"))
    assert "gs://no-such-bucket does not exist" in _one_line(e) and "gcloud storage buckets create" in str(e.value)


def test_a_data_dir_url_without_train_bin(gcs_server, token_data, tmp_path):
    url = f"{gcs_server()}/half"
    storage.upload(token_data / "meta.json", f"{url}/meta.json")
    storage.upload(token_data / "val.bin", f"{url}/val.bin")
    with pytest.raises(DataError) as e:
        train(tiny_run_config(url, tmp_path / "out", **{"data.cache_dir": str(tmp_path / "cache")}))
    assert f"data.data_dir={url} has no train.bin" in _one_line(e)
    assert not (tmp_path / "out").exists()


def test_no_credentials(gcs_server, token_data, tmp_path, monkeypatch):
    """As on a machine without Application Default Credentials: gcsfs, told to use them, finds none."""
    import fsspec
    import gcsfs
    from etils.epath import backend

    def fresh_clients():  # epath and fsspec keep one gcsfs client per process
        backend.fsspec_backend._get_filesystem.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()

    bucket = gcs_server()
    monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "google_default"})
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login here
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")  # and no metadata server: not a Cloud VM
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:1")
    fresh_clients()
    try:
        with pytest.raises(UserError) as e:
            train(tiny_run_config(token_data, f"{bucket}/run"))
    finally:
        monkeypatch.undo()
        fresh_clients()
    assert "no Google Cloud credentials" in _one_line(e) and "gcloud auth application-default login" in str(e.value)


def test_export_to_a_bucket_and_init_from_it(gcs_server, tiny_config, tiny_params, tmp_path, monkeypatch):
    """export_hf writes an HF folder to gs://; load_pretrained (init_from) copies it back and reads it."""
    from nanogpt_jax import convert

    monkeypatch.setattr(storage, "WEIGHTS_CACHE_DIR", str(tmp_path / "weights"))
    url = f"{gcs_server()}/exports/tiny-hf"
    convert.export_hf(tiny_config, tiny_params, url)
    assert {p.name for p in storage.path(url).iterdir()} == {"config.json", "model.safetensors"}
    _, params = convert.load_pretrained(url)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, tiny_params))


def test_bench_data_mode_reads_a_bucket_data_dir(gcs_server, token_data, tmp_path):
    """run_bench.py's data mode times the bucket's tokens (through the checked local copy), not random ids."""
    from configs import tiny
    from nanogpt_jax.bench.data import bench_rows

    url = upload_data(token_data, f"{gcs_server()}/bench")
    c = tiny.get_config()
    c.data.data_dir, c.data.cache_dir, c.bench.steps = url, str(tmp_path / "cache"), 10
    rows = bench_rows(c)
    assert rows and all(r["settings"]["source"] == url for r in rows), rows
    assert (storage.cache_folder(url, tmp_path / "cache") / "train.bin").read_bytes() == \
        (token_data / "train.bin").read_bytes()


def test_a_prompt_file_in_a_bucket(gcs_server):
    from nanogpt_jax import sample

    url = f"{gcs_server()}/prompts/p.txt"
    storage.write_atomic(url, "ROMEO:")
    assert sample.read_prompt(f"FILE:{url}") == "ROMEO:"
    with pytest.raises(UserError, match="cannot read it"):
        sample.read_prompt(f"FILE:{gcs_server()}/prompts/missing.txt")
