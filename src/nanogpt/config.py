"""Typed configuration: the dataclass schemas behind every shipped YAML, and their checks.

This is the only place defaults live. Hydra composes YAML from `src/nanogpt/config/` on top of
these schemas (a typo'd key or a wrong type fails at start-up); the CLI then converts the result
once to these dataclasses and the library never sees a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt.errors import ConfigError
from nanogpt.model import GPTConfig

CONFIG_DIR = str(Path(__file__).with_name("config"))  # YAML shipped inside the package

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class SystemConfig:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 where supported, else fp16; fp32 on CPU), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    strategy: str = "auto"  # auto (= ddp): every rank holds the whole model; fsdp: ranks shard it (FSDP2)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    cpu_offload: bool = False  # fsdp only: keep parameter, gradient and AdamW shards in CPU memory


@dataclass
class DataConfig:
    name: str = "shakespeare_char"  # dataset module used by nanogpt-prepare
    data_dir: str = "data/${data.name}"  # folder with train.bin, val.bin, meta.json
    batch_size: int = 12  # sequences per micro-step (per rank)
    sampler: str = "random"  # random (with replacement, nanoGPT's) or epoch (permutation, no replacement)
    # -- used by nanogpt-prepare only --
    tokenizer: str = ""  # "" (the dataset's own), gpt2 (tiktoken BPE) or char; only data=text may choose
    input: Any = ""  # data=text: a file, folder or glob, or a list of them ([a.txt,docs/])
    val_fraction: float = 0.1  # text / shakespeare: the last fraction of characters is validation
    num_proc: int = 0  # tokenizer threads / worker processes; 0: all cores
    hf_dataset: str = "Skylion007/openwebtext"  # openwebtext: hub id, save_to_disk folder or data files
    hf_split: str = "train"
    text_field: str = "text"  # the column holding each document
    val_docs: int = 4000  # openwebtext: documents held out for validation (evenly spaced)
    shard_docs: int = 8192  # openwebtext: documents per resumable shard


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_iters: int = 2000
    decay_lr: bool = True  # cosine from lr to min_lr over lr_decay_iters; False keeps lr constant
    lr_decay_iters: int = "${train.max_iters}"  # type: ignore[assignment]  # interpolated


@dataclass
class TrainConfig:
    max_iters: int = 600000
    eval_interval: int = 2000
    eval_iters: int = 200  # validation batches per evaluation (a fixed set of windows)
    log_interval: int = 1
    grad_accum_steps: int = 1  # micro-steps per optimizer step, over all ranks together
    eval_only: bool = False  # evaluate the initial weights once and stop
    max_bad_steps: int = 10  # consecutive non-finite steps (skipped) before the run stops
    final_eval: bool = True  # at the end, the exact loss over every val token (summary: val_loss_exact)
    eval_tasks: list[str] = field(default_factory=list)  # nanogpt-eval tasks to log, e.g. [hellaswag]
    eval_tasks_interval: int = 0  # run them every N iterations (a multiple of eval_interval); 0: at the end
    eval_hellaswag_limit: int | None = 500  # HellaSwag examples per run during training (null: all 10,042)


@dataclass
class ConsoleLoggerConfig:
    """Always on: one line per logged step through `logging`."""

    progress: bool = True  # False: only evaluations and the summary


@dataclass
class CSVLoggerConfig:
    filename: str = "metrics.csv"  # in out_dir; one row per logged step (what nanogpt-plot reads)


@dataclass
class TensorBoardLoggerConfig:
    log_dir: str = "tensorboard"  # relative to out_dir (`tensorboard --logdir <out_dir>`)


@dataclass
class WandbLoggerConfig:
    project: str = "nanogpt"
    entity: str | None = None  # user or team; None: your default entity
    name: str | None = None  # run name; None: the name of out_dir
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # online | offline (no network; `wandb sync` later) | disabled

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb.mode={self.mode!r} must be online, offline or disabled")


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the local folder ./mlruns
    experiment: str = "nanogpt"
    run_name: str | None = None  # None: the name of out_dir


@dataclass
class LoggerConfig:
    """Logging backends; null is off. Chosen with `logger=[csv,tensorboard]` (console is always on)."""

    console: ConsoleLoggerConfig = field(default_factory=ConsoleLoggerConfig)
    csv: CSVLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None
    mlflow: MLflowLoggerConfig | None = None


@dataclass
class TrainJob:
    """Everything `nanogpt-train` needs."""

    out_dir: str = "out"
    init_from: str = "scratch"  # scratch | resume | a pretrained name (gpt2 ... gpt2-xl) | an HF folder
    system: SystemConfig = field(default_factory=SystemConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SampleJob:
    """Everything `nanogpt-sample` needs."""

    out_dir: str = "out"  # where the checkpoint is, with init_from=resume
    init_from: str = "resume"  # resume | a checkpoint file | a GPT-2 name | an HF folder
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 200
    top_p: float | None = None
    stop_at_eot: bool = True  # stop a sample at <|endoftext|>
    seed: int = 1337
    system: SystemConfig = field(default_factory=SystemConfig)


def check_sample_job(job: SampleJob) -> SampleJob:
    check_system(job.system)
    if job.num_samples < 1 or job.max_new_tokens < 1:
        raise ConfigError("num_samples and max_new_tokens must be positive")
    if job.temperature < 0:
        raise ConfigError(f"temperature={job.temperature} must be >= 0 (0 is greedy)")
    if job.top_k is not None and job.top_k < 1:
        raise ConfigError(f"top_k={job.top_k} must be >= 1 (or null)")
    if job.top_p is not None and not 0.0 < job.top_p <= 1.0:
        raise ConfigError(f"top_p={job.top_p} must be in (0, 1] (or null)")
    return job


@dataclass
class ExportJob:
    """Everything `nanogpt-export` needs: one checkpoint in, one Hugging Face GPT-2 folder out."""

    checkpoint: str = "out"  # a training out_dir or a checkpoint file
    hf_dir: str = ""  # output folder; empty: `hf/` next to the checkpoint
    prefer: str = "best"  # in an out_dir: best (best.pt, else ckpt.pt) or latest (ckpt.pt first)
    dtype: str = "float32"  # of the exported weights: float32, bfloat16 or float16


def check_export_job(job: ExportJob) -> ExportJob:
    if not job.checkpoint:
        raise ConfigError("checkpoint must name a training out_dir or a checkpoint file")
    if job.prefer not in ("best", "latest"):
        raise ConfigError(f"prefer={job.prefer!r} must be 'best' or 'latest'")
    if job.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={job.dtype!r} must be float32, bfloat16 or float16")
    return job


# ---- cross-field checks ------------------------------------------------------------------------


def check_system(s: SystemConfig) -> None:
    base = s.device.split(":")[0]
    if base not in DEVICES:
        raise ConfigError(f"system.device={s.device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if s.dtype not in DTYPES:
        raise ConfigError(f"system.dtype={s.dtype!r} is not one of {', '.join(DTYPES)}")
    if s.strategy not in STRATEGIES:
        raise ConfigError(f"system.strategy={s.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if s.cpu_offload and s.strategy != "fsdp":
        raise ConfigError("system.cpu_offload=true needs system.strategy=fsdp (only FSDP can offload its shards)")


def check_model(m: GPTConfig) -> None:
    for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")


def check_optim(o: OptimConfig) -> None:
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}; set min_lr <= lr")
    if o.decay_lr and o.warmup_iters > o.lr_decay_iters:
        raise ConfigError(
            f"optim.warmup_iters={o.warmup_iters} exceeds optim.lr_decay_iters={o.lr_decay_iters}"
        )
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    if o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")


def check_train_job(job: TrainJob) -> TrainJob:
    """Cross-field rules of a training job; raises ConfigError naming the key to fix."""
    check_system(job.system)
    check_model(job.model)
    check_optim(job.optim)
    t = job.train
    for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "grad_accum_steps"):
        if getattr(t, key) < (0 if key == "max_iters" else 1):
            raise ConfigError(f"train.{key}={getattr(t, key)} must be positive")
    bad = [x for x in t.eval_tasks if x not in EVAL_TASKS or x in ("sample", "text")]
    if bad:
        raise ConfigError(f"train.eval_tasks={bad}: choose from loss, wikitext, hellaswag")
    if t.eval_tasks_interval and t.eval_tasks_interval % t.eval_interval:
        raise ConfigError(f"train.eval_tasks_interval={t.eval_tasks_interval} must be a multiple of "
                          f"train.eval_interval={t.eval_interval}")
    if job.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={job.data.batch_size} must be positive")
    if job.data.sampler not in ("random", "epoch"):
        raise ConfigError(f"data.sampler={job.data.sampler!r} must be 'random' or 'epoch'")
    if not job.out_dir:
        raise ConfigError("out_dir must be set")
    return job


@dataclass
class PrepareJob:
    """Everything `nanogpt-prepare` needs: the dataset to tokenize and where to write it."""

    data: DataConfig = field(default_factory=DataConfig)


FIXED_TOKENIZERS = {"shakespeare_char": "char", "shakespeare": "gpt2", "openwebtext": "gpt2"}


def check_prepare_job(job: PrepareJob) -> PrepareJob:
    d = job.data
    if d.tokenizer not in ("", "gpt2", "char"):
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} must be gpt2 or char")
    fixed = FIXED_TOKENIZERS.get(d.name)
    if fixed and d.tokenizer not in ("", fixed):
        raise ConfigError(f"data={d.name} always uses tokenizer {fixed}; for another use data=text")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    for key in ("val_docs", "shard_docs"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key}={getattr(d, key)} must be positive")
    if d.num_proc < 0:
        raise ConfigError(f"data.num_proc={d.num_proc} must be >= 0 (0: all cores)")
    if not d.data_dir:
        raise ConfigError("data.data_dir must be set")
    return job


@dataclass
class BenchGenerateConfig:
    """nanogpt-bench mode=generate: greedy decoding of random prompts."""

    prompt_tokens: int = 16
    new_tokens: int = 128
    cache: list[bool] = field(default_factory=lambda: [True, False])  # with and without the KV cache
    repeats: int = 1  # timed generate calls per configuration (the median is reported)


@dataclass
class BenchDataConfig:
    """nanogpt-bench mode=data: nanogpt.data.benchmark's prepare and loader throughput."""

    prepare_mb: float = 4.0  # synthetic corpus to tokenize; 0 skips the prepare benchmark
    dataset: str = "text"  # text | openwebtext (the prepare module used)
    tokenizer: str = "gpt2"  # gpt2 | char
    num_proc: int = 0  # 0: all cores
    loader_tokens: int = 1 << 24  # random tokens in the loader's memory-mapped file
    loader_iters: int = 200
    samplers: list[str] = field(default_factory=lambda: ["random", "epoch"])


@dataclass
class BenchJob:
    """Everything `nanogpt-bench` needs. List-valued keys sweep: one record per combination."""

    mode: str = "train"  # train | generate | data | profile
    train_config: str = "train_shakespeare_char_cpu"  # the training preset whose real step is timed
    model: GPTConfig | None = None  # model=gpt2, tiny, ...; null: the preset's model
    block_size: int | None = None  # null: the model's
    data_dir: str | None = None  # prepared data to read; null: random tokens in a temporary folder
    device: str = "auto"
    batch_sizes: list[int] = field(default_factory=list)  # empty: the preset's data.batch_size
    dtypes: list[str] = field(default_factory=list)  # empty: the preset's system.dtype
    compile: list[bool] = field(default_factory=list)  # empty: the preset's system.compile
    compile_cache: bool = False  # false: compile from scratch (a first run's cost); true: reuse inductor's disk cache
    grad_accum_steps: int = 1  # micro-steps per timed step
    warmup_steps: int = 3  # untimed steps first (the first one holds compilation)
    steps: int = 10  # timed steps (the median is reported)
    profile_steps: int = 3  # mode=profile: steps recorded in the trace
    threads: int = 0  # torch.set_num_threads; 0: torch's default
    peak_flops: float | None = None  # the device's peak FLOP/s for MFU; null: table or CPU probe
    train_overrides: list[str] = field(default_factory=list)  # extra overrides for the preset
    generate: BenchGenerateConfig = field(default_factory=BenchGenerateConfig)
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    out: str = "bench"  # folder for <name>.json, <name>.md, <name>.png and profile traces
    name: str = ""  # file name stem; empty: <mode>-<date>-<time>
    chart: bool = True  # a PNG of a sweep (needs matplotlib)
    compare: list[str] = field(default_factory=list)  # [a.json, b.json]: print ratios, run nothing


BENCH_MODES = ("train", "generate", "data", "profile")


def check_bench_job(job: BenchJob) -> BenchJob:
    if job.compare:
        if len(job.compare) != 2:
            raise ConfigError(f"compare needs two JSON files, got {len(job.compare)}")
        return job
    if job.mode not in BENCH_MODES:
        raise ConfigError(f"mode={job.mode!r} is not one of {', '.join(BENCH_MODES)}")
    check_system(SystemConfig(device=job.device))
    for dtype in job.dtypes:
        if dtype not in DTYPES:
            raise ConfigError(f"dtypes: {dtype!r} is not one of {', '.join(DTYPES)}")
    if job.model is not None:
        check_model(job.model)
    g = job.generate
    positive = {"batch_sizes": min(job.batch_sizes, default=1), "block_size": job.block_size or 1,
                "warmup_steps": job.warmup_steps, "steps": job.steps, "profile_steps": job.profile_steps,
                "grad_accum_steps": job.grad_accum_steps, "generate.prompt_tokens": g.prompt_tokens,
                "generate.new_tokens": g.new_tokens, "generate.repeats": g.repeats}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be positive, got {value}")
    if job.threads < 0 or job.data.prepare_mb < 0:
        raise ConfigError("threads and data.prepare_mb must be >= 0")
    if not set(job.data.samplers) <= {"random", "epoch"}:
        raise ConfigError(f"data.samplers={job.data.samplers} may hold only random and epoch")
    return job


EVAL_TASKS = ("loss", "text", "wikitext", "hellaswag", "sample")
EVAL_PROMPTS = ("Hello, I'm a language model,", "ROMEO:")


@dataclass
class EvalJob:
    """Everything `nanogpt-eval` needs: models to compare and the tasks to run on each."""

    models: list[str] = field(default_factory=list)  # out_dirs, checkpoint files, gpt2 ... gpt2-xl, HF dirs
    tasks: list[str] = field(default_factory=lambda: ["loss"])  # loss, text, wikitext, hellaswag, sample
    data_dir: str | None = None  # loss: prepared data; null: the one an out_dir was trained on
    split: str = "val"  # loss: the split scored
    text_files: list[str] = field(default_factory=list)  # text: raw text files, e.g. [wiki.test.raw]
    stride: int | None = None  # loss/text/wikitext: window stride; null: block_size (no overlap)
    batch_size: int = 8  # windows, or HellaSwag examples (x4 endings), per forward pass
    hellaswag_limit: int | None = None  # the first N examples; null: all 10,042
    cache_dir: str = "data"  # downloads: <cache_dir>/hellaswag/, <cache_dir>/wikitext-2/
    prompts: list[str] = field(default_factory=lambda: list(EVAL_PROMPTS))  # sample
    max_new_tokens: int = 64  # sample
    seed: int = 1337  # sample
    out: str | None = None  # report path prefix (<out>.json, <out>.md); null: next to a single checkpoint
    system: SystemConfig = field(default_factory=SystemConfig)


def check_eval_job(job: EvalJob) -> EvalJob:
    check_system(job.system)
    if not job.models:
        raise ConfigError("models is empty: name what to evaluate, e.g. models=[out-shakespeare-char-cpu]")
    unknown = [t for t in job.tasks if t not in EVAL_TASKS]
    if unknown or not job.tasks:
        raise ConfigError(f"tasks={job.tasks}: choose from {', '.join(EVAL_TASKS)}")
    if "text" in job.tasks and not job.text_files:
        raise ConfigError("the text task needs text_files=[file,...]")
    for key in ("batch_size", "stride", "hellaswag_limit", "max_new_tokens"):
        value = getattr(job, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be positive (or null where allowed)")
    return job


# ---- registration and conversion ---------------------------------------------------------------

SCHEMAS: dict[str, tuple[type, Any]] = {
    "train_schema": (TrainJob, check_train_job),
    "sample_schema": (SampleJob, check_sample_job),
    "export_schema": (ExportJob, check_export_job),
    "prepare_schema": (PrepareJob, check_prepare_job),
    "bench_schema": (BenchJob, check_bench_job),
    "eval_schema": (EvalJob, check_eval_job),
}


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (primary YAMLs list one first in defaults)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, (schema, _check) in SCHEMAS.items():
        cs.store(name=name, node=schema)


def to_dataclass(cfg: Any, schema_name: str = "train_schema") -> Any:
    """Composed DictConfig -> validated dataclass instance (drops Hydra's own `hydra` node)."""
    schema, check = SCHEMAS[schema_name]
    try:
        # merge a plain container so that every key is checked against the schema again
        plain = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}
        node = OmegaConf.merge(OmegaConf.structured(schema), plain)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:  # e.g. a key added with +key= that the schema lacks
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{msg} (full_key: {getattr(e, 'full_key', '?')}); check the key's spelling") from None
    return check(obj)


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain, JSON-safe dict (for checkpoints and logger hyperparameters)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "GPTConfig",
    "LoggerConfig",
    "OptimConfig",
    "SystemConfig",
    "TrainConfig",
    "TrainJob",
    "check_train_job",
    "register_configs",
    "to_dataclass",
    "to_dict",
]
