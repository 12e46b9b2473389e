"""optim.name="muon": Muon on the blocks' hidden matrices, AdamW on the rest, sharded and resumable.

The reference is written here, in float64 numpy, from the published method rather than read from optax:
the quintic Newton-Schulz iteration with Jordan's coefficients (3.4445, -4.7750, 2.0315), 5 steps
(Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024, and modded-nanogpt's
zeropower_via_newtonschulz5), with the conventions of optax.contrib.muon (optax/contrib/_muon.py, 0.2.8)
where the method leaves a choice open:
- the matrix is divided by its Frobenius norm + 1e-8 first, and a tall one (rows > columns) is iterated
  transposed (orthogonalize_via_newton_schulz, preconditioning="frobenius");
- Nesterov momentum with bias correction: mu_t = beta mu_{t-1} + (1 - beta) g_t and the orthogonalised
  matrix is that of beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t) (scale_by_muon);
- a weight of more than two axes is the matrix (reduction axes flattened) x (output axes flattened); axes
  in neither are batch axes, each slice orthogonalised on its own (_compute_muon_reshape);
- the result is scaled by sqrt(max(1, fan_out / fan_in)) (scale_by_shape, consistent_rms=None), weight decay
  added as wd x p, then multiplied by -learning_rate (muon's chain).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
import pytest
from conftest import DROPOUT, OPTIMIZERS, tiny_run_config
from test_optim import nanogpt_lr
from test_optim import run_optax as run_optax_with
from test_step import ATOL, CONFIG, batches
from test_step import OPTIM as STEP_OPTIM

from nanogpt_jax import loggers, sharding
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.config import validate
from nanogpt_jax.errors import CheckpointError, ConfigError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.optim import OptimConfig, hidden_matrix_dims, make_optimizer
from nanogpt_jax.step import abstract_state, init_state, make_train_step, param_axes
from nanogpt_jax.train import train

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan 2024
NS_EPS = 1e-8

# Distinct non-default values, so that a swapped or ignored one shows. muon_lr is large so that Muon's
# part of each step (~muon_lr x 1/sqrt(width)) stands far above the comparison's tolerance.
OPTIM = OptimConfig(name="muon", learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=10,
                    weight_decay=0.3, beta1=0.8, beta2=0.99, grad_clip=0.5, muon_lr=0.2, muon_momentum=0.9,
                    muon_ns_steps=5, muon_weight_decay=0.4)

# A small tree with the model's names, layouts and logical axes: the four kernels of a block, one stacked
# (scan_layers) c_attn kernel of 2 layers, and AdamW's kinds of parameter.
AXES = {
    "wte/embedding": ("vocab", "embed"),
    "wpe/embedding": (None, "embed"),
    "ln_f/scale": ("norm",),
    "h_0/attn/c_attn/kernel": ("embed", "qkv", "heads", "kv"),
    "h_0/attn/c_attn/bias": ("qkv", "heads", "kv"),
    "h_0/attn/c_proj/kernel": ("heads", "kv", "embed"),
    "h_0/mlp/c_fc/kernel": ("embed", "mlp"),
    "h_0/mlp/c_fc/bias": ("mlp",),
    "h_0/mlp/c_proj/kernel": ("mlp", "embed"),
    "h/attn/c_attn/kernel": ("layers", "embed", "qkv", "heads", "kv"),
    "h/ln_1/bias": ("layers", "norm"),
}
SHAPES = {
    "wte/embedding": (11, 8),
    "wpe/embedding": (5, 8),
    "ln_f/scale": (8,),
    "h_0/attn/c_attn/kernel": (8, 3, 2, 4),
    "h_0/attn/c_attn/bias": (3, 2, 4),
    "h_0/attn/c_proj/kernel": (2, 4, 8),
    "h_0/mlp/c_fc/kernel": (8, 16),
    "h_0/mlp/c_fc/bias": (16,),
    "h_0/mlp/c_proj/kernel": (16, 8),
    "h/attn/c_attn/kernel": (2, 8, 3, 2, 4),
    "h/ln_1/bias": (2, 8),
}
# Each Muon leaf as (batch, fan_in, fan_out) matrices: (batch axes, reduction axes, output axes) as the
# issue states them for our layouts; "layers" is a batch axis.
MATRICES = {
    "h_0/attn/c_attn/kernel": ((), (0,), (1, 2, 3)),  # (D, 3, H, K) -> D x 3D
    "h_0/attn/c_proj/kernel": ((), (0, 1), (2,)),  # (H, K, D) -> D x D
    "h_0/mlp/c_fc/kernel": ((), (0,), (1,)),  # (D, 4D)
    "h_0/mlp/c_proj/kernel": ((), (0,), (1,)),  # (4D, D): tall, iterated transposed
    "h/attn/c_attn/kernel": ((0,), (1,), (2, 3, 4)),
}
RTOL, TOL = 1e-6, 1e-6  # float32 params of size ~0.5, float64 reference


def newton_schulz(G: np.ndarray, steps: int = 5, coeffs: tuple = NS_COEFFS) -> np.ndarray:
    """Jordan's quintic iteration X <- a X + (b A + c A^2) X, A = X X^T, on G / (|G|_F + eps)."""
    X = np.asarray(G, np.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (np.linalg.norm(X) + NS_EPS)
    a, b, c = coeffs
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def orthogonalise(x: np.ndarray, axes: tuple, width_scale: bool = True, **ns) -> np.ndarray:
    """Newton-Schulz of each (fan_in, fan_out) slice of x, times sqrt(max(1, fan_out / fan_in))."""
    batch, red, out = axes
    perm = batch + red + out
    fan_in, fan_out = math.prod(x.shape[a] for a in red), math.prod(x.shape[a] for a in out)
    m = np.transpose(x, perm).reshape(-1, fan_in, fan_out)
    o = np.stack([newton_schulz(s, **ns) for s in m]) * (math.sqrt(max(1.0, fan_out / fan_in)) if width_scale else 1)
    return np.transpose(o.reshape([x.shape[a] for a in perm]), np.argsort(perm))


def reference(c: OptimConfig, params: dict, grads: list[dict], nesterov: bool = True, matrices: dict = MATRICES,
              **ns_mistakes) -> list[dict]:
    """Params (flat) after each step: global-norm clipping of every gradient, then Muon (this module's
    docstring) on MATRICES' leaves and nanoGPT's AdamW (decay on kernels and embeddings) on the others."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        g = {k: np.asarray(v, np.float64) for k, v in g.items()}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in g.values()))
        if c.grad_clip > 0 and norm > c.grad_clip:
            g = {k: v * c.grad_clip / norm for k, v in g.items()}
        lr = nanogpt_lr(t - 1, c)
        for k in p:
            if k in matrices:
                b = c.muon_momentum
                mu[k] = b * mu[k] + (1 - b) * g[k]
                look = b * mu[k] / (1 - b ** (t + 1)) + (1 - b) * g[k] / (1 - b**t) if nesterov else mu[k] / (1 - b**t)
                update = orthogonalise(look, matrices[k], **ns_mistakes) + c.muon_weight_decay * p[k]
                p[k] = p[k] - lr * c.muon_lr / c.learning_rate * update
            else:
                mu[k] = c.beta1 * mu[k] + (1 - c.beta1) * g[k]
                nu[k] = c.beta2 * nu[k] + (1 - c.beta2) * g[k] ** 2
                m_hat, v_hat = mu[k] / (1 - c.beta1**t), nu[k] / (1 - c.beta2**t)
                decay = c.weight_decay if k.endswith(("kernel", "embedding")) else 0.0
                p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + decay * p[k])
        out.append({k: v.copy() for k, v in p.items()})
    return out


def make_problem(norms: tuple[float, ...] = (30.0, 0.2, 4.0), seed: int = 0) -> tuple[dict, list[dict]]:
    """Random float32 params and one gradient per step, its global norm set to norms[i] (the second
    under grad_clip, the others over it)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
    grads = []
    for norm in norms:
        g = {k: rng.normal(0, 1, s) for k, s in SHAPES.items()}
        total = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        grads.append({k: (x * norm / total).astype(np.float32) for k, x in g.items()})
    return params, grads


def run_optax(c: OptimConfig, params: dict, grads: list[dict]) -> list[dict]:
    """Params (flat) after each step of make_optimizer(c, AXES)."""
    return run_optax_with(c, params, grads, unflatten_axes(AXES))


def unflatten_axes(flat: dict) -> dict:
    """AXES as the nested tree of name tuples that hidden_matrix_dims reads."""
    tree: dict = {}
    for path, names in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = names
    return tree


def max_diff(ours: list[dict], ref: list[dict], keys=SHAPES) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for a, b in zip(ours, ref, strict=True) for k in keys)


def test_muon_matches_the_newton_schulz_reference():
    """Every leaf after each of 3 steps: Muon's (a 2-D matrix, a tall one, the 3- and 4-axis attention
    kernels, a stacked 5-axis one) and AdamW's, against the float64 reference."""
    params, grads = make_problem()
    ours, ref = run_optax(OPTIM, params, grads), reference(OPTIM, params, grads)
    wrong = [f"step {t} {k}: max abs diff {np.max(np.abs(a[k] - b[k])):.3g}"
             for t, (a, b) in enumerate(zip(ours, ref, strict=True)) for k in SHAPES
             if not np.allclose(a[k], b[k], rtol=RTOL, atol=TOL)]
    assert not wrong, "\n".join(wrong)


def test_muon_reference_sees_each_mistake():
    """The comparison has teeth: each plausible mistake, made in the reference, moves a Muon leaf far past
    the tolerance (the AdamW leaves are checked against torch in test_optim.py)."""
    params, grads = make_problem()
    ref = reference(OPTIM, params, grads)
    whole_c_attn = {**MATRICES, "h/attn/c_attn/kernel": ((), (0, 1), (2, 3, 4))}  # layers folded into fan_in
    per_head = {**MATRICES, "h_0/attn/c_attn/kernel": ((1,), (0,), (2, 3))}  # q, k, v each on its own
    mistakes = {
        "no Nesterov": lambda: reference(OPTIM, params, grads, nesterov=False),
        "4 Newton-Schulz steps": lambda: reference(OPTIM, params, grads, steps=4),
        "cubic coefficients (1.5, -0.5, 0)": lambda: reference(OPTIM, params, grads, coeffs=(1.5, -0.5, 0.0)),
        "no width scaling": lambda: reference(OPTIM, params, grads, width_scale=False),
        "layers not a batch axis": lambda: reference(OPTIM, params, grads, matrices=whole_c_attn),
        "q, k, v orthogonalised apart": lambda: reference(OPTIM, params, grads, matrices=per_head),
        "no Muon weight decay": lambda: reference(dataclasses.replace(OPTIM, muon_weight_decay=0.0), params, grads),
    }
    for name, run in mistakes.items():
        assert max_diff(run(), ref) > 100 * TOL, name  # seen: 0.09 (4 steps) to 0.30 (no decay); ours: 2.1e-7


def test_adamw_leaves_under_muon_are_adamws():
    """The parameters Muon leaves to AdamW get exactly what optim.name="adamw" gives them: the same clipping
    (over every gradient) and the same AdamW."""
    params, grads = make_problem()
    muon, adamw = run_optax(OPTIM, params, grads), run_optax(dataclasses.replace(OPTIM, name="adamw"), params, grads)
    for a, b in zip(muon, adamw, strict=True):
        for k in SHAPES.keys() - MATRICES.keys():
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("scan", [False, True])
def test_muon_updates_exactly_the_blocks_kernels(tiny_config, scan):
    """On the real tiny GPT, both layouts: Muon's leaves and their dimension numbers are a literal list,
    and the built optimizer's state holds Muon's momentum for those leaves and AdamW's moments for the rest."""
    model = GPT(dataclasses.replace(tiny_config, scan_layers=scan))
    blocks = ["h"] if scan else [f"h_{i}" for i in range(tiny_config.n_layer)]
    s = int(scan)  # the stacked layout's leading "layers" axis shifts every axis by one
    want = {}
    for b in blocks:
        want |= {f"{b}/attn/c_attn/kernel": ((s,), (s + 1, s + 2, s + 3)),
                 f"{b}/attn/c_proj/kernel": ((s, s + 1), (s + 2,)),
                 f"{b}/mlp/c_fc/kernel": ((s,), (s + 1,)),
                 f"{b}/mlp/c_proj/kernel": ((s,), (s + 1,))}
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))  # shapes only: no FLOPs
    dims = hidden_matrix_dims(param_axes(model))
    flat = jax.tree_util.tree_flatten_with_path(dims, is_leaf=lambda x: x is None or hasattr(x, "reduction_axis"))[0]
    got = {"/".join(k.key for k in path): (d.reduction_axis, d.output_axis) for path, d in flat if d is not None}
    assert got == want
    assert len(flat) == len(jax.tree.leaves(params))

    def moment_leaves(node) -> set[str]:
        leaves = jax.tree_util.tree_flatten_with_path(node)[0]
        return {"/".join(k.key for k in path) for path, _ in leaves}

    state = jax.eval_shape(make_optimizer(OPTIM, param_axes(model)).init, params)
    partition = state[1].inner_states
    muon_mu = partition["muon"].inner_state[0].mu  # chain: (scale_by_muon, width, decay, lr)
    adamw = partition["adamw"].inner_state[0]
    everything = moment_leaves(params)
    assert moment_leaves(muon_mu) == set(want)
    assert moment_leaves(adamw.mu) == moment_leaves(adamw.nu) == everything - set(want)
    assert {k.rsplit("/", 1)[-1] for k in everything - set(want)} == {"embedding", "bias", "scale"}


MUON = dataclasses.replace(STEP_OPTIM, name="muon", muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.1)


def run_muon(mesh, config, n_steps=3, A=2, B=8):
    """test_step.run with Muon: (state, losses) after n_steps of dropout-on training."""
    model = GPT(config)
    state = init_state(model, make_optimizer(MUON, param_axes(model)), mesh, jax.random.key(0))
    step = make_train_step(model, MUON, mesh, state, grad_accum=A, seed=0)
    losses = []
    for s in range(n_steps):
        state, metrics = step(state, *batches(s, A=A, B=B))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def muon_one_device():
    """{scan_layers: 3 Muon steps on one device}, each computed when first asked for."""
    cache = {}

    def get(scan: bool):
        if scan not in cache:
            config = dataclasses.replace(CONFIG, scan_layers=scan)
            cache[scan] = run_muon(sharding.make_mesh(devices=jax.devices()[:1]), config)
        return cache[scan]

    return get


@pytest.mark.parametrize("shape,scan", [((1, 8, 1), False), ((2, 2, 2), False), ((2, 2, 2), True),
                                        ((4, 2, 1), True)])
def test_muon_sharded_meshes_equal_one_device(muon_one_device, shape, scan):
    """FSDP and tensor-parallel meshes (dropout on, 2 micro-batches) train with Muon as one device does: the
    same losses, and every leaf of the TrainState (params, Muon's momentum, AdamW's moments, counts) the same
    up to float32 round-off after 3 steps; the momentum is sharded like its parameter."""
    ref_state, ref_losses = muon_one_device(scan)
    mesh = sharding.make_mesh(*shape)
    state, losses = run_muon(mesh, dataclasses.replace(CONFIG, scan_layers=scan))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
    kernels = state.params["h" if scan else "h_0"]["mlp"]["c_fc"]
    mu = state.opt_state[1].inner_states["muon"].inner_state[0].mu
    mu_kernel = (mu["h"] if scan else mu["h_0"])["mlp"]["c_fc"]["kernel"]
    assert mu_kernel.sharding == kernels["kernel"].sharding
    assert mu_kernel.addressable_shards[0].data.shape == kernels["kernel"].addressable_shards[0].data.shape


MUON_RUN = {**OPTIMIZERS["muon"], **DROPOUT}


def restore_state(out) -> dict:
    """The whole TrainState of out_dir's latest checkpoint (a Muon run's), as numpy arrays on one device."""
    with Checkpointer(checkpoint_dir(out), read_only=True) as ckpt:
        step = ckpt.latest_step()
        model = GPT(GPTConfig(**ckpt.record(step)["model"]))
        optimizer = make_optimizer(OptimConfig.from_section(tiny_run_config("", "", **MUON_RUN).optim),
                                   param_axes(model))
        state, _ = ckpt.restore(abstract_state(model, optimizer, sharding.make_mesh(devices=jax.devices()[:1])), step)
    return jax.tree.map(np.asarray, state)


@pytest.mark.slow
def test_muon_resume_in_process_is_bit_identical(token_data, tmp_path, tiny_runs):
    """A Muon run (dropout 0.1) stopped at its step-10 checkpoint and resumed ends bit for bit where the
    uninterrupted one does: every leaf of the TrainState, Muon's momentum included, and every logged loss."""
    ref_out, out = tiny_runs("muon")[0], tmp_path / "resumed"
    train(tiny_run_config(token_data, out, **{"train.max_iters": 10, **MUON_RUN}))
    train(tiny_run_config(token_data, out, **{"init_from": "resume", **MUON_RUN}))
    got, want = restore_state(out), restore_state(ref_out)
    assert int(got.step) == 20
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert loggers.read_metrics(out)["train/loss"] == loggers.read_metrics(ref_out)["train/loss"]
    mu = got.opt_state[1].inner_states["muon"].inner_state[0].mu
    assert np.abs(mu["h_0"]["mlp"]["c_fc"]["kernel"]).max() > 0  # the momentum was saved, not re-initialised


@pytest.mark.slow
def test_resume_with_the_other_optimizer_is_a_one_line_error(token_data, tmp_path):
    """An AdamW checkpoint resumed with optim.name=muon is refused before anything is built,
    naming the optimizer it was saved with; the folder is left as it was."""
    out = tmp_path / "adamw"
    train(tiny_run_config(token_data, out, **{"train.max_iters": 10}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"^init_from=resume: checkpoint step 10 in .* was trained with "
                       r"optim.name=adamw, not muon; resume with --config.optim.name=adamw, or start a new run"):
        train(tiny_run_config(token_data, out, **{"init_from": "resume", "optim.name": "muon",
                                                  "train.max_iters": 20}))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("key,value,message", [
    ("name", "lion", "optim.name='lion': choose one of adamw, muon"),
    ("muon_lr", 0.0, "optim.muon_lr=0.0: must be > 0"),
    ("muon_momentum", 1.0, "optim.muon_momentum=1.0: must be in [0, 1)"),
    ("muon_ns_steps", 0, "optim.muon_ns_steps=0: must be >= 1"),
    ("muon_weight_decay", -0.1, "optim.muon_weight_decay=-0.1: must be >= 0"),
])
def test_bad_optim_values_are_one_line_config_errors(key, value, message):
    from configs import default

    c = default.get_config()
    c.optim[key] = value
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        validate(c)


def compiled_collectives(optim: OptimConfig, mesh, config: GPTConfig) -> dict[str, int]:
    """How many of each collective the compiled train step (A=1, B=8) holds on `mesh`."""
    model = GPT(config)
    abstract = abstract_state(model, make_optimizer(optim, param_axes(model)), mesh)
    step = make_train_step(model, optim, mesh, abstract, grad_accum=1, seed=0)
    x = jax.ShapeDtypeStruct((1, 8, config.block_size), np.int32, sharding=sharding.batch_sharding(mesh, 3))
    with sharding.activate(mesh):
        text = step.jitted.lower(abstract, x, x).compile().as_text()
    return {op: len(re.findall(rf" {op}(-start)?\(", text)) for op in ("all-gather", "all-to-all")}


@pytest.mark.parametrize("shape,scan", [((1, 8, 1), False), ((4, 2, 1), True)])
def test_newton_schulz_moves_each_matrix_once(shape, scan):
    """Newton-Schulz runs on whole matrices (optim.whole_matrices), so Muon adds a fixed number of collectives
    to AdamW's step per hidden matrix, not some per Newton-Schulz iteration (XLA, left alone, ran the
    iterations on fsdp shards and gathered inside them: 411 all-gathers here against AdamW's 51).
    Unscanned blocks: each gradient and momentum is all-gathered once (2 per matrix). Scanned blocks over
    one mesh axis: the layers are spread over it instead, one all-to-all each way for the gradient, the
    momentum, the update and the new momentum (4 per stacked matrix) and no added all-gather."""
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    mesh = sharding.make_mesh(*shape)
    adamw = compiled_collectives(STEP_OPTIM, mesh, config)
    muon = compiled_collectives(MUON, mesh, config)
    hidden = 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    if scan:
        assert muon == {"all-gather": adamw["all-gather"], "all-to-all": adamw["all-to-all"] + 4 * hidden}
    else:
        assert adamw["all-gather"] > 0
        assert muon == {"all-gather": adamw["all-gather"] + 2 * hidden * config.n_layer,
                        "all-to-all": adamw["all-to-all"]}
