"""Every config key, its default and its unit. Other configs start from this one and override.

The defaults are nanoGPT's: GPT-2 124M trained from scratch on OpenWebText. Optional values are
placeholders (None that can still be set from the command line); sequences are tuples.
"""

from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 1337  # seeds parameter init, dropout and the order of training batches
    c.out_dir = "out"  # checkpoints, logs and summary.json of a training run
    # where the weights come from: "scratch", "resume" (out_dir's checkpoint), a GPT-2 name
    # (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local Hugging Face GPT-2 folder
    c.init_from = "scratch"

    c.model = config_dict.ConfigDict()
    # Shape. With init_from a GPT-2 name, HF folder or resume, the checkpoint's own shape is used;
    # only block_size (cropped, never grown) and the compute options below apply.
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.n_embd = 768  # width; n_embd % n_head == 0
    c.model.block_size = 1024  # context length in tokens
    # rows of the token embedding; None: the data's vocabulary (meta.json), padded to a multiple
    # of 64 for GPT-2's BPE (50257 -> 50304, as nanoGPT does)
    c.model.vocab_size = placeholder(int)
    c.model.dropout = 0.0  # probability; 0.0 for pretraining, 0.1+ for finetuning
    c.model.bias = True  # biases in linear layers and LayerNorms, as GPT-2
    c.model.dtype = "auto"  # compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU, else float32)
    c.model.scan_layers = False  # nn.scan over blocks: compile time independent of depth
    c.model.remat = "none"  # none, full, or a jax.checkpoint_policies name (activation memory)
    c.model.attention = "auto"  # xla, cudnn, splash, or auto (splash on TPUs, cudnn on GPUs with bf16/fp16)
    # output head + cross-entropy: chunked (chunks of positions, no float32 (B, T, V) logits kept) or full
    c.model.loss = "chunked"
    c.model.loss_chunk = 0  # positions per chunk of the chunked loss; 0: from the shapes (~256 MiB logits/device)

    c.data = config_dict.ConfigDict()
    c.data.data_dir = "data/openwebtext"  # folder with train.bin, val.bin and meta.json; or gs://bucket/folder
    c.data.cache_dir = "~/.cache/nanogpt_jax/data"  # each host's checked local copy of a gs:// data_dir

    c.train = config_dict.ConfigDict()
    c.train.batch_size = 12  # global sequences per micro-step (over all devices and hosts)
    c.train.gradient_accumulation_steps = 40  # micro-steps per optimizer step
    c.train.max_iters = 600_000  # optimizer steps
    c.train.eval_interval = 2000  # steps between evaluations and checkpoints
    c.train.eval_iters = 200  # batches per split in each evaluation
    c.train.log_interval = 10  # steps between console / logger lines
    c.train.always_save_checkpoint = True  # save every eval_interval, not only on a new best val loss
    c.train.keep_checkpoints = 2  # latest checkpoints kept (the best one is kept as well)
    c.train.max_skipped = 10  # consecutive non-finite steps tolerated before the run stops
    c.train.eval_tasks = ()  # run_eval tasks to run at every evaluation, e.g. ("hellaswag",)
    c.train.check_memory = True  # refuse, before compiling, a shape the memory estimator says cannot fit
    c.train.eval_only = False  # evaluate the initial (or resumed) model on the fixed batches, print, write nothing

    c.optim = config_dict.ConfigDict()
    # adamw: AdamW on every parameter (nanoGPT). muon: Muon on the hidden matrices of every block (the
    # kernels of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) and this same AdamW on the rest
    # (embeddings, the tied head, biases, LayerNorm gains); docs/training.md, "Muon"
    c.optim.name = "adamw"
    c.optim.learning_rate = 6e-4  # peak learning rate
    c.optim.min_lr = 6e-5  # floor of the cosine decay (learning_rate / 10, per Chinchilla)
    c.optim.warmup_iters = 2000  # steps of linear warmup
    c.optim.lr_decay_iters = 600_000  # step where the cosine reaches min_lr (~max_iters)
    c.optim.decay_lr = True  # False: constant learning_rate
    c.optim.weight_decay = 0.1  # AdamW decoupled decay, on matrices and embeddings only
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.95
    c.optim.grad_clip = 1.0  # global-norm clip; 0.0 disables
    # Muon (optim.name=muon; Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
    # and modded-nanogpt; optax.contrib.muon). Its update is an orthogonalised matrix (entries ~1/sqrt(width)),
    # so its learning rate is on another scale than AdamW's: modded-nanogpt's 0.02 (later records 0.05)
    c.optim.muon_lr = 0.02  # peak; follows learning_rate's warmup and cosine: muon_lr x lr(t) / learning_rate
    c.optim.muon_momentum = 0.95  # Nesterov momentum coefficient (optax's and modded-nanogpt's default)
    c.optim.muon_ns_steps = 5  # Newton-Schulz iterations, coefficients (3.4445, -4.7750, 2.0315) (Jordan 2024)
    # decoupled decay of the Muon matrices, multiplied by the Muon learning rate as AdamW's is by its own:
    # p -= muon_lr(t) x muon_weight_decay x p each step; 0.0 as optax's default and Jordan's first Muon
    c.optim.muon_weight_decay = 0.0

    c.mesh = config_dict.ConfigDict()
    # devices along each mesh axis; -1 = all remaining devices. batch is split over data x fsdp.
    c.mesh.data = -1  # data parallel: replicas
    c.mesh.fsdp = 1  # fully sharded: parameters, gradients and optimizer state split (ZeRO-3)
    c.mesh.tensor = 1  # tensor parallel: heads and MLP hidden units split (Megatron)

    c.log = config_dict.ConfigDict()
    c.log.tensorboard = True  # tensorboardX event files in out_dir/tb
    c.log.csv = True  # out_dir/metrics.csv
    c.log.wandb_project = placeholder(str)  # set to log to Weights & Biases (the wandb extra)

    c.sample = config_dict.ConfigDict()
    c.sample.prompt = "\n"  # prompt text, or FILE:path to read it from a file
    c.sample.num_samples = 1  # samples, generated as one batch
    c.sample.max_new_tokens = 256  # tokens generated per sample
    c.sample.temperature = 0.8  # 0 = greedy; < 1 sharper, > 1 more random
    c.sample.top_k = placeholder(int)  # keep the k likeliest tokens
    c.sample.top_p = placeholder(float)  # keep the smallest set with probability >= top_p
    c.sample.seed = 1337
    c.sample.checkpoint = "latest"  # with init_from=resume: latest or best

    c.eval = config_dict.ConfigDict()
    # loss, text, wikitext2, hellaswag, and lm-evaluation-harness tasks as "lm_eval:<task>[,<task>...]"
    # (pip install -e .[eval]; docs/evaluation.md)
    c.eval.tasks = ("loss",)
    c.eval.split = "val"  # split of data_dir for the loss task
    c.eval.text_path = placeholder(str)  # text file for the text task
    c.eval.stride = placeholder(int)  # sliding-window stride in tokens; None = block_size (wikitext2: half)
    # quick runs: hellaswag scores its first max_examples examples, wikitext2 its first max_examples windows
    # (of block_size tokens, every eval.stride), lm_eval tasks their first max_examples documents (the harness's
    # limit); loss and text always score every token. None = no cap
    c.eval.max_examples = placeholder(int)
    # global rows per forward pass: windows (loss, text, wikitext2), examples of 4 endings (hellaswag) or
    # requests (lm_eval: scored rows, prompts generated together);
    # rounded up to a multiple of mesh.data x mesh.fsdp
    c.eval.batch_size = 8
    c.eval.out = placeholder(str)  # report path (JSON; a .md beside it); None = out_dir/eval.json
    c.eval.checkpoint = "latest"  # with init_from=resume: latest or best (lowest val loss)
    c.eval.cache_dir = "data"  # downloads: <cache_dir>/hellaswag/, <cache_dir>/wikitext-2/
    # hellaswag's text: llmc (raw ctx and endings, llm.c's figures) or harness (lm-evaluation-harness's
    # hellaswag: activity label, cleaned text; then acc / acc_norm_char are the harness's acc / acc_norm)
    c.eval.hellaswag_prompt = "llmc"
    c.eval.lm_eval_include_path = placeholder(str)  # lm_eval tasks: a folder of extra task YAMLs
    c.eval.num_fewshot = placeholder(int)  # lm_eval tasks: few-shot examples; None = each task's default

    c.bench = config_dict.ConfigDict()
    c.bench.mode = "train"  # train, generate, data or profile
    c.bench.steps = 20  # timed train steps (profile: traced steps; generate: timed calls per case)
    c.bench.warmup = 3  # untimed steps (generate: calls) after compilation and a first call
    # global batch sizes to run, e.g. (4, 8, 16): a sweep, charted; () = train.batch_size (generate: 1 and 8)
    c.bench.batch_sizes = ()
    c.bench.out = placeholder(str)  # JSON report (markdown, PNG beside it); None = bench/<mode>.json
    c.bench.compare = placeholder(str)  # an earlier result.json to print ratios against
    c.bench.peak_tflops = placeholder(float)  # override the device's peak TFLOP/s for MFU
    c.bench.data = False  # train/profile: True reads data.data_dir's train.bin via the loader; False: random ids

    c.dist = config_dict.ConfigDict()
    # multi-process runs; on Cloud TPU VMs and under SLURM jax finds these itself
    c.dist.coordinator_address = placeholder(str)  # host:port of process 0
    c.dist.num_processes = placeholder(int)
    c.dist.process_id = placeholder(int)
    # a process that sends no heartbeat for this long is lost: every other one exits with one line (seconds)
    c.dist.heartbeat_timeout_s = 30
    # start-up: how long the processes wait for all of them to join (seconds; JAX's default)
    c.dist.initialization_timeout_s = 300

    c.compilation_cache_dir = placeholder(str)  # persistent XLA cache; None = off

    if arg:
        raise ValueError(f"configs/default.py has no variant {arg!r}")
    return c


def pretrained(name: str, arg: str | None = None) -> config_dict.ConfigDict:
    """A config for OpenAI's GPT-2 `name`: its shape, its real 50257-token vocabulary, sampling settings."""
    from nanogpt_jax.model import GPT2_SIZES, GPT2_VOCAB_SIZE

    c = get_config(arg)
    c.init_from = name
    c.out_dir = f"out-{name}"
    c.model.n_layer, c.model.n_head, c.model.n_embd = GPT2_SIZES[name]
    c.model.vocab_size = GPT2_VOCAB_SIZE
    c.sample.prompt = "Hello, I'm a language model,"
    c.sample.num_samples = 3
    c.sample.max_new_tokens = 100
    c.sample.top_k = 200
    return c
