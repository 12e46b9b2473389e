"""Run karpathy/nanoGPT's own scripts and ours on this machine, same shapes, and print both.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    (cd /tmp/nanoGPT && python data/shakespeare_char/prepare.py)       # nanoGPT's own data step
    python scripts/nanogpt_side_by_side.py /tmp/nanoGPT                 # from this repo's root
    python scripts/nanogpt_side_by_side.py /tmp/nanoGPT --what train --iters 200 --rounds 2 --json side.json
    python scripts/nanogpt_side_by_side.py /tmp/nanoGPT --what step --device cuda --compile --dtype bfloat16 \
        --step-batch 16 --step-block 1024                              # a GPU: torch.compile against ours

nanoGPT stays in its own checkout: this script runs its files there, in their own processes, and
never copies them. Three comparisons (--what, comma-separated; default all):

  train   nanoGPT's README CPU run, `train.py config/train_shakespeare_char.py --device=cpu
          --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
          --n_layer=4 --n_head=4 --n_embd=128 --lr_decay_iters=2000 --dropout=0.0` for --iters
          iterations, with --bias=True (our shape) and as the README has it (bias=False)
          (median of its "time" column, iteration 0 left out), against
          `run_train.py --config configs/shakespeare_char.py:cpu` on the checkout's own
          data/shakespeare_char (read through its meta.pkl) for as many steps, with and without
          biases (--config.model.bias; summary.json's ms_per_step: the median, the first step
          left out).
  step    GPT-2 124M shape, a whole train step at --step-batch x --step-block tokens in --dtype
          (float32 by default): nanoGPT's `bench.py --device=cpu --compile=False --real_data=False`
          (bias False, as bench.py sets it; without CUDA, torch.cuda.synchronize, which a CPU-only
          torch lacks, is made a no-op) against `run_bench.py --config configs/owt.py` with the same
          shape and dtype. On a GPU: --device cuda --compile (torch.compile) --dtype bfloat16 (bench.py
          then runs under torch.autocast in bfloat16, as nanoGPT trains; ours computes in bfloat16).
          MFU for both from the same formula (metrics.FLOPS_FORMULA) and the same peak (our run's:
          the CPU matmul probe, or the datasheet of the GPU). `python -m nanogpt_jax.device_check
          --nanogpt=DIR` runs this comparison on the machine it checks.
  sample  GPT-2 124M shape (random weights, float32, batch 1, a --prompt-len token prompt,
          --new-tokens new tokens, temperature 0.8, top_k 200 as sample.py samples): nanoGPT's
          `GPT.generate` from the checkout's model.py, called the way sample.py calls it (eval
          mode, torch.no_grad; sample.py itself needs a trained checkpoint), against
          `nanogpt_jax.generate.generate` (KV cache). New tokens per second of the whole call,
          prefill included, best of --repeats after a warm-up call.

Each side runs --rounds times, alternating, so that a change in the machine's load hits both; the
table shows the median over rounds and the 1-minute load average around each run. Our side runs
with one CPU device (XLA_FLAGS without a forced device count) and the machine's default threads,
as does torch. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
              "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--lr_decay_iters=2000",
              "--dropout=0.0"]

# nanoGPT's bench.py calls torch.cuda.synchronize(), which a CPU-only torch build rejects; run it unchanged
# otherwise (runpy, in the checkout, with its own command-line overrides)
BENCH_SHIM = """
import runpy, sys, torch
if not torch.cuda.is_available():  # a GPU's synchronize stays: it ends each timed stretch
    torch.cuda.synchronize = lambda *a, **k: None
sys.argv = ["bench.py"] + sys.argv[1:]
runpy.run_path("bench.py", run_name="__main__")
"""

# nanoGPT's generate as sample.py calls it, on its GPT built from the checkout's model.py
NANOGPT_SAMPLE = """
import json, sys, time, torch
from model import GPT, GPTConfig
prompt_len, new, repeats = (int(a) for a in sys.argv[1:4])
torch.manual_seed(1337)
model = GPT(GPTConfig())  # GPT-2 124M: 12 x 12 x 768, block 1024, vocab 50304, bias
model.eval()
x = torch.randint(50257, (1, prompt_len))
times = []
with torch.no_grad():
    model.generate(x, 2, temperature=0.8, top_k=200)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(x, new, temperature=0.8, top_k=200)
        times.append(time.perf_counter() - t0)
print(json.dumps({"times_s": times, "threads": torch.get_num_threads(), "torch": torch.__version__}))
"""

OURS_SAMPLE = """
import json, sys, time
import jax, jax.numpy as jnp
from nanogpt_jax import generate
from nanogpt_jax.model import GPT, GPTConfig, PADDED_VOCAB_SIZE, init_params
prompt_len, new, repeats = (int(a) for a in sys.argv[1:4])
model = GPT(GPTConfig.gpt2("gpt2", vocab_size=PADDED_VOCAB_SIZE, dtype="float32"))
params = jax.jit(lambda k: init_params(model, k))(jax.random.key(1337))
x = jax.random.randint(jax.random.key(0), (1, prompt_len), 0, 50257, jnp.int32)
kw = dict(temperature=0.8, top_k=200, rng=jax.random.key(0))
t0 = time.perf_counter()
generate.generate(model, params, x, new, **kw).block_until_ready()  # compiles
compile_s = time.perf_counter() - t0
times = []
for i in range(repeats):
    t0 = time.perf_counter()
    generate.generate(model, params, x, new, **{**kw, "rng": jax.random.key(i)}).block_until_ready()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times_s": times, "compile_s": compile_s, "jax": jax.__version__}))
"""


def load() -> float:
    return os.getloadavg()[0]


def our_env() -> dict:
    """One CPU device for our side: drop a forced host device count (tests set 8)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run a command; its stdout (stderr appended, for parsing logs); exit with its tail on failure."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed ({r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
    return r.stdout + r.stderr


def timed(fn, *args) -> dict:
    before = load()
    out = fn(*args)
    return {**out, "load_before": before, "load_after": load()}


# ---- train: nanoGPT's README CPU run vs run_train.py shakespeare_char.py:cpu ------------------------


def nanogpt_train(checkout: Path, iters: int, tmp: Path) -> dict:
    """nanoGPT's README run (bias=False, train.py's default) and the same run with bias=True, the shape
    of ours (configs/shakespeare_char.py keeps GPT-2's biases)."""
    out = {}
    for key, bias in (("ms_per_step", True), ("ms_per_step_readme", False)):
        log = run([sys.executable, "train.py", "config/train_shakespeare_char.py", *TRAIN_ARGS, f"--bias={bias}",
                   f"--max_iters={iters}", f"--out_dir={tmp / 'nanogpt-train'}"], checkout)
        ms = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log) if int(i) > 0]
        out[key] = statistics.median(ms)
    return out


def ours_train(checkout: Path, iters: int, tmp: Path) -> dict:
    """configs/shakespeare_char.py:cpu as it is (GPT-2's biases) and with model.bias=False, the README's shape."""
    result = {}
    for key, bias in (("ms_per_step", True), ("ms_per_step_readme", False)):
        out = tmp / f"ours-train-{len(list(tmp.glob('ours-train-*')))}"
        run([sys.executable, "run_train.py", "--config", "configs/shakespeare_char.py:cpu",
             f"--config.data.data_dir={checkout / 'data' / 'shakespeare_char'}", f"--config.out_dir={out}",
             f"--config.train.max_iters={iters}", f"--config.model.bias={bias}"], ROOT, our_env())
        summary = json.loads((out / "summary.json").read_text())
        result[key] = summary["ms_per_step"]
        if bias:
            result["val_loss"] = summary["val_loss"]
    return result


# ---- step: GPT-2 124M train step, nanoGPT's bench.py vs run_bench.py ------------------------------


def nanogpt_step(checkout: Path, batch: int, block: int, tmp: Path, device: str = "cpu", compile: bool = False,
                 dtype: str = "float32") -> dict:
    log = run([sys.executable, "-c", BENCH_SHIM, f"--device={device}", f"--compile={compile}", "--real_data=False",
               f"--dtype={dtype}", f"--batch_size={batch}", f"--block_size={block}"], checkout)
    ms = float(re.search(r"time per iteration: ([\d.]+)ms", log).group(1))
    return {"ms_per_step": ms, "tokens_per_s": batch * block / (ms / 1e3)}


def ours_step(checkout: Path, batch: int, block: int, tmp: Path, device: str = "cpu", compile: bool = False,
              dtype: str = "float32") -> dict:
    """run_bench.py on the default backend (`device` and `compile` are nanoGPT's: ours always compiles)."""
    out = tmp / "ours-step.json"
    run([sys.executable, "run_bench.py", "--config", "configs/owt.py", f"--config.train.batch_size={batch}",
         f"--config.model.block_size={block}", "--config.train.gradient_accumulation_steps=1",
         "--config.model.bias=False", "--config.model.vocab_size=50304", f"--config.model.dtype={dtype}",
         "--config.bench.steps=10", "--config.bench.warmup=2", f"--config.bench.out={out}",
         f"--config.out_dir={tmp}"], ROOT, our_env())
    r = json.loads(out.read_text())["rows"][0]["results"]
    return {k: r[k] for k in ("ms_per_step", "tokens_per_s", "mfu", "flops_per_token", "peak_flops_per_device",
                              "peak_source", "compile_s")}


# ---- sample: GPT-2 124M decode, batch 1, float32 ----------------------------------------------------


def nanogpt_sample(checkout: Path, prompt_len: int, new: int, repeats: int) -> dict:
    r = json.loads(run([sys.executable, "-c", NANOGPT_SAMPLE, str(prompt_len), str(new), str(repeats)],
                       checkout).strip().splitlines()[-1])
    return {"tokens_per_s": new / min(r["times_s"]), "times_s": r["times_s"], "torch_threads": r["threads"]}


def ours_sample(checkout: Path, prompt_len: int, new: int, repeats: int) -> dict:
    r = json.loads(run([sys.executable, "-c", OURS_SAMPLE, str(prompt_len), str(new), str(repeats)], ROOT,
                       our_env()).strip().splitlines()[-1])
    return {"tokens_per_s": new / min(r["times_s"]), "times_s": r["times_s"], "compile_s": r["compile_s"]}


# ---- the table -----------------------------------------------------------------------------------


def versions() -> dict:
    code = "import torch, jax, flax; print(torch.__version__, jax.__version__, flax.__version__)"
    torch_v, jax_v, flax_v = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"torch": torch_v, "jax": jax_v, "flax": flax_v, "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def median_of(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkout", type=Path, help="a karpathy/nanoGPT checkout (with data/shakespeare_char prepared)")
    p.add_argument("--what", default="train,step,sample", help="comma-separated: train, step, sample")
    p.add_argument("--iters", type=int, default=200, help="train: iterations of each run")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--step-batch", type=int, default=4)
    p.add_argument("--step-block", type=int, default=256)
    p.add_argument("--device", default="cpu", help="step: nanoGPT's device (cpu, cuda)")
    p.add_argument("--compile", action="store_true", help="step: nanoGPT's model under torch.compile")
    p.add_argument("--dtype", default="float32", help="step: float32 or bfloat16, both sides")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="sample: timed calls (best counts)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args()
    checkout = args.checkout.resolve()
    what = args.what.split(",")
    if not (checkout / "model.py").is_file() or not (checkout / "train.py").is_file():
        sys.exit(f"error: {checkout} is not a nanoGPT checkout (no model.py / train.py)")
    if "train" in what and not (checkout / "data" / "shakespeare_char" / "train.bin").is_file():
        sys.exit(f"error: prepare nanoGPT's data first: (cd {checkout} && python data/shakespeare_char/prepare.py)")

    results: dict = {"date": datetime.date.today().isoformat(), "machine": versions(), "args": {
        k: str(v) for k, v in vars(args).items()}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jobs = {
            "train": (nanogpt_train, ours_train, (checkout, args.iters, tmp)),
            "step": (nanogpt_step, ours_step, (checkout, args.step_batch, args.step_block, tmp, args.device,
                                                args.compile, args.dtype)),
            "sample": (nanogpt_sample, ours_sample, (checkout, args.prompt_len, args.new_tokens, args.repeats)),
        }
        for name in what:
            theirs_fn, ours_fn, fn_args = jobs[name]
            theirs, ours = [], []
            for i in range(args.rounds):  # alternate, the order flipped each round
                order = [(theirs_fn, theirs), (ours_fn, ours)] if i % 2 == 0 else [(ours_fn, ours), (theirs_fn, theirs)]
                for fn, out in order:
                    out.append(timed(fn, *fn_args))
                    print(f"{name} {fn.__name__}: {json.dumps(out[-1])}", file=sys.stderr, flush=True)
            results[name] = {"nanogpt": theirs, "ours": ours}
            loads = [r[k] for r in theirs + ours for k in ("load_before", "load_after")]
            load_range = f"{min(loads):.1f}-{max(loads):.1f}"
            if name == "train":
                a, b = median_of(theirs, "ms_per_step"), median_of(ours, "ms_per_step")
                rows.append(("shakespeare_char CPU run (4x4x128, B12 T64, fp32, bias): ms/iter", a, b, a / b,
                             load_range))
                a, b = median_of(theirs, "ms_per_step_readme"), median_of(ours, "ms_per_step_readme")
                rows.append(("  the same without biases (nanoGPT's README run): ms/iter", a, b, a / b, load_range))
            elif name == "step":
                a, b = median_of(theirs, "tokens_per_s"), median_of(ours, "tokens_per_s")
                peak, fpt = ours[0]["peak_flops_per_device"], ours[0]["flops_per_token"]
                rows.append((f"gpt2 124M train step B{args.step_batch} T{args.step_block} {args.dtype} on "
                             f"{args.device}{' (torch.compile)' if args.compile else ''}: tokens/s", a, b, b / a,
                             load_range))
                if peak:
                    rows.append((f"  MFU (same formula and peak, {peak / 1e12:.3g} TFLOP/s)", fpt * a / peak,
                                 fpt * b / peak, None, load_range))
            else:
                a, b = median_of(theirs, "tokens_per_s"), median_of(ours, "tokens_per_s")
                rows.append((f"gpt2 124M sample, batch 1, {args.prompt_len}+{args.new_tokens} tokens, fp32: "
                             "tokens/s", a, b, b / a, load_range))
    results["table"] = rows
    m = results["machine"]
    print(f"\n{results['date']}, {m['cpu']} ({m['cpu_count']} CPUs); torch {m['torch']}, jax {m['jax']}, "
          f"flax {m['flax']}; median of {args.rounds} alternating runs\n")
    print("| figure | nanoGPT | nanogpt_jax | ours vs nanoGPT | load avg |")
    print("|---|---|---|---|---|")
    for label, a, b, ratio, loads in rows:
        fmt = (lambda v: f"{100 * v:.1f}%") if "MFU" in label else (lambda v: f"{v:,.1f}")
        ratio_s = "-" if ratio is None else (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio_s} | {loads} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
