"""The optimizer against an independent oracle: torch.optim.AdamW with clip_grad_norm_, as nanoGPT trains.

Everything the reference needs is decided here, not read from nanogpt_jax.optim: the learning rate of
each step is nanoGPT's `get_lr` written out again, and which leaves get weight decay is a literal list.
Hyper-parameters are all non-default and distinct (beta1 != beta2, a warmup so every step has its own
learning rate), so that a swapped, dropped or shifted one changes the result.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from nanogpt_jax.model import GPT, init_params
from nanogpt_jax.optim import OptimConfig, decay_mask, make_optimizer

OPTIM = OptimConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=10, decay_lr=True,
                    weight_decay=0.3, beta1=0.8, beta2=0.99, grad_clip=0.5)
EPS = 1e-8  # torch.optim.AdamW's default, which nanoGPT uses
RTOL, ATOL = 1e-6, 1e-6  # float32 params of size ~1: a few ulps

# A small tree with the model's real names and layouts (attention kernels and biases carry head axes).
SHAPES = {
    "wte/embedding": (11, 8),
    "wpe/embedding": (5, 8),
    "h_0/ln_1/scale": (8,),
    "h_0/ln_1/bias": (8,),
    "h_0/attn/c_attn/kernel": (8, 3, 2, 4),
    "h_0/attn/c_attn/bias": (3, 2, 4),
    "h_0/attn/c_proj/kernel": (2, 4, 8),
    "h_0/attn/c_proj/bias": (8,),
    "h_0/mlp/c_fc/kernel": (8, 32),
    "h_0/mlp/c_fc/bias": (32,),
    "ln_f/scale": (8,),
    "ln_f/bias": (8,),
}
# nanoGPT decays every matrix and embedding and nothing else; by name, since c_attn's bias is rank 3 here.
DECAYED = {"wte/embedding", "wpe/embedding", "h_0/attn/c_attn/kernel", "h_0/attn/c_proj/kernel",
           "h_0/mlp/c_fc/kernel"}
# This leaf's gradients are 1e-6 of the others': ~2e-8 once clipped, the size of epsilon, so a wrong
# epsilon shows in it (elsewhere sqrt(v) ~ 2e-2 hides it), and so does skipped clipping (unclipped,
# they dwarf epsilon).
TINY = "h_0/ln_1/scale"
# Global gradient norm of each step, all far above grad_clip. They differ from step to step because Adam
# is blind to a scale shared by every step: only a per-step rescaling (clipping) changes its moments' mix.
STEP_NORMS = (2000.0, 30.0, 400.0)


def nanogpt_lr(it: int, c: OptimConfig) -> float:
    """nanoGPT's train.py get_lr(it), transcribed (not nanogpt_jax.optim.lr_schedule)."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}} as float32 jax arrays: the nested dict the model's params are."""
    tree: dict = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(x, jnp.float32)
    return tree


def flatten(tree: dict) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): np.asarray(x) for path, x in leaves}


def make_problem(norms: tuple[float, ...], seed: int = 0) -> tuple[dict, list[dict]]:
    """Random float32 params and one gradient per step, as flat {path: array}, the step's global norm
    set to norms[i] and TINY's gradients 1e-6 of the others' scale."""
    rng = np.random.default_rng(seed)
    params = {p: rng.normal(0, 0.5, s).astype(np.float32) for p, s in SHAPES.items()}
    grads = []
    for norm in norms:
        g = {p: rng.normal(0, 1, s) for p, s in SHAPES.items()}
        g[TINY] *= 1e-6
        total = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        grads.append({p: (x * norm / total).astype(np.float32) for p, x in g.items()})
    return params, grads


def run_optax(c: OptimConfig, params: dict, grads: list[dict], param_axes: dict | None = None) -> list[dict]:
    """Params (flat) after each step of make_optimizer(c, param_axes) (the axes: Muon's, tests/test_muon.py)."""
    opt = make_optimizer(c, param_axes)

    @jax.jit  # one compile for all steps: op-by-op dispatch would cost seconds on a test machine
    def step(tree: dict, state: optax.OptState, g: dict) -> tuple[dict, optax.OptState]:
        updates, state = opt.update(g, state, tree)
        return optax.apply_updates(tree, updates), state

    tree = unflatten(params)
    state = opt.init(tree)
    out = []
    for g in grads:
        tree, state = step(tree, state, unflatten(g))
        out.append(flatten(tree))
    return out


def run_torch(c: OptimConfig, params: dict, grads: list[dict], eps: float = EPS, decayed: set[str] = DECAYED,
              first_it: int = 0) -> list[dict]:
    """Params (flat) after each step of nanoGPT's loop: clip_grad_norm_ (if grad_clip > 0), the step's
    get_lr into every group, AdamW.step. In float64, so the reference carries no rounding of its own.
    (eps, decayed and first_it exist to show that the comparison would see them wrong.)"""
    tensors = {p: torch.tensor(x, dtype=torch.float64) for p, x in params.items()}
    groups = [{"params": [tensors[p] for p in SHAPES if p in decayed], "weight_decay": c.weight_decay},
              {"params": [tensors[p] for p in SHAPES if p not in decayed], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=eps)
    out = []
    for it, g in enumerate(grads, start=first_it):
        for p, t in tensors.items():
            t.grad = torch.tensor(g[p], dtype=torch.float64)
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), c.grad_clip)
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, c)
        opt.step()
        out.append({p: t.detach().numpy().copy() for p, t in tensors.items()})
    return out


def max_abs_diff(ours: list[dict], ref: list[dict]) -> float:
    """Largest difference of any leaf after any step."""
    return max(float(np.max(np.abs(a[p] - b[p]))) for a, b in zip(ours, ref, strict=True) for p in SHAPES)


def assert_steps_match(ours: list[dict], ref: list[dict]) -> None:
    """Every leaf after every step, to float32 rounding: params are ~0.5 (ulp 6e-8), the largest
    difference seen is 1.8e-7, and each mistake in test_comparison_sees_each_mistake moves >= 2.7e-3."""
    wrong = [f"step {it} {p}: max abs diff {np.max(np.abs(a[p] - b[p])):.3g}"
             for it, (a, b) in enumerate(zip(ours, ref, strict=True)) for p in SHAPES
             if not np.allclose(a[p], b[p], rtol=RTOL, atol=ATOL)]  # all of them: the pattern tells the cause
    if wrong:
        pytest.fail("\n".join(wrong), pytrace=False)


def test_adamw_with_clipping_matches_torch():
    """Clipping, both betas, epsilon, masked decoupled weight decay and the per-step learning rate
    together, against nanoGPT's torch optimizer; then one step under the clip, which must not scale it."""
    params, grads = make_problem(STEP_NORMS + (0.1,))
    assert_steps_match(run_optax(OPTIM, params, grads), run_torch(OPTIM, params, grads))


def test_grad_clip_zero_means_no_clipping():
    """grad_clip=0 turns clipping off (nanoGPT's `if grad_clip != 0.0`), rather than clipping to norm 0."""
    c = dataclasses.replace(OPTIM, grad_clip=0.0)
    params, grads = make_problem(STEP_NORMS)
    assert_steps_match(run_optax(c, params, grads), run_torch(c, params, grads))


def test_comparison_sees_each_mistake():
    """The comparison has teeth: each plausible mistake, made in the reference, moves some leaf far past
    the tolerance. This guards the problem's design (gradient norms, the TINY leaf) against edits that
    would let a mistake hide, e.g. equal step norms, under which Adam cannot tell clipping happened."""
    params, grads = make_problem(STEP_NORMS)
    ref = run_torch(OPTIM, params, grads)
    swapped = dataclasses.replace(OPTIM, beta1=OPTIM.beta2, beta2=OPTIM.beta1)
    mistakes = {"no clipping": lambda: run_torch(dataclasses.replace(OPTIM, grad_clip=0.0), params, grads),
                "betas swapped": lambda: run_torch(swapped, params, grads),
                "eps 1e-6": lambda: run_torch(OPTIM, params, grads, eps=1e-6),
                "decay on every leaf": lambda: run_torch(OPTIM, params, grads, decayed=set(SHAPES)),
                "no decay": lambda: run_torch(OPTIM, params, grads, decayed=set()),
                "lr one step late": lambda: run_torch(OPTIM, params, grads, first_it=1)}
    for name, run in mistakes.items():
        assert max_abs_diff(run(), ref) > 100 * ATOL, name  # seen: 2.7e-3 (betas) to 1.8e-2 (clipping)


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_is_exactly_kernels_and_embeddings(tiny_config, scan):
    """Every leaf of the real tiny GPT: decayed iff it is a kernel or an embedding. The scanned layout
    stacks layers, making biases and LayerNorm parameters rank 2, so a rank rule would decay them there.
    Shapes only (eval_shape): the mask depends on names, and initializing would cost seconds."""
    model = GPT(dataclasses.replace(tiny_config, scan_layers=scan))
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    blocks = ["h"] if scan else [f"h_{i}" for i in range(tiny_config.n_layer)]
    expected = {"wte/embedding", "wpe/embedding"} | {
        f"{b}/{m}/kernel" for b in blocks for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
    mask = flatten(decay_mask(params))
    assert len(mask) == len(jax.tree.leaves(params))
    assert {p for p, decayed in mask.items() if decayed} == expected
