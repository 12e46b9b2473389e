"""A seconds-long model and run for tests and smoke checks on a CPU (2 layers, width 32, block 32).

    python run_train.py --config configs/tiny.py --config.data.data_dir=data/shakespeare_char
"""

from configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.out_dir = "out-tiny"
    c.data.data_dir = "data/shakespeare_char"
    c.model.n_layer, c.model.n_head, c.model.n_embd = 2, 2, 32
    c.model.block_size = 32
    c.model.dtype = "float32"  # exact comparisons in tests
    c.train.batch_size = 8
    c.train.gradient_accumulation_steps = 1
    c.train.max_iters = 20
    c.train.eval_interval = 10
    c.train.eval_iters = 2
    c.train.log_interval = 5
    c.optim.learning_rate = 1e-2
    c.optim.min_lr = 1e-3
    c.optim.warmup_iters = 2
    c.optim.lr_decay_iters = 20
    c.sample.max_new_tokens = 32
    c.eval.batch_size = 4
    c.bench.steps = 3
    c.bench.warmup = 1
    return c
