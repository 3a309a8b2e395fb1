"""APOLLO and APOLLO-Mini against the paper's update rule (arXiv 2412.05270, Algorithm 1, with the norm-growth
limiter it takes from Fira) written here in fp64; the seed-only projection; state bytes against the formula;
exact resume of the optimizer state; the recipe rules. Runs through the real loop (per-layer, DDP, sharding,
resume, loss against AdamW) are in tests/test_apollo_train.py."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from tests.helpers import QUICKSTART, small_llama
from trainer.errors import ConfigError
from trainer.optim.apollo import ApolloAdamW, expected_state_bytes, projection_seed, random_projection
from trainer.optim.lowrank import state_bytes
from trainer.optim.lowrank_groups import build_lowrank, lowrank_defaults, lowrank_param_groups, state_cost
from trainer.recipe.resolve import resolve
from trainer.recipe.schema import ApolloConfig, OptimizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LR, BETAS, EPS, DECAY, GAP, STEPS = 1e-2, (0.9, 0.95), 1e-8, 0.1, 3, 8


def gradients(shape: tuple[int, int], steps: int) -> list[torch.Tensor]:
    """A fixed sequence with a jump in norm at step 5 (x 4), so the norm-growth limiter has to act."""
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(shape, generator=gen) * (0.5 + 0.1 * t) for t in range(steps)]
    grads[4] = grads[4] * 4
    grads[2][:, 1] = 0.0  # a channel with no gradient: the guard keeps its scale finite
    return grads


def reference(w0: torch.Tensor, grads: list[torch.Tensor], seeds: list[int], rank: int, scale_type: str,
              alpha: float, gamma: float | None) -> torch.Tensor:
    """The paper's rule in fp64, for W (m x n): P with N(0, 1/r) entries from the seed of the step, on the
    smaller side (R = P^T G, r x n, when m <= n; R = G P, m x r, otherwise); Adam moments of R with bias
    correction; R~ = M^ / (sqrt(V^) + eps); the scale per kept channel (columns of R for a left projection,
    rows for a right one) or per tensor, s = ||R~|| / (||R|| + 1e-8); U = G s; Fira's limiter: if
    ||U_t|| > gamma ||U_{t-1}|| then U_t <- U_t gamma ||U_{t-1}|| / ||U_t||; W <- (1 - lr wd) W - lr alpha U."""
    m, n = w0.shape
    left = m <= n
    w = w0.double()
    exp_avg = exp_avg_sq = None
    previous = None
    for t, (g32, seed) in enumerate(zip(grads, seeds), start=1):
        g = g32.double()
        p = random_projection(m if left else n, rank, seed, torch.device("cpu")).double()
        r = p.T @ g if left else g @ p
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(r), torch.zeros_like(r)
        exp_avg = BETAS[0] * exp_avg + (1 - BETAS[0]) * r
        exp_avg_sq = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * r * r
        r_tilde = (exp_avg / (1 - BETAS[0] ** t)) / ((exp_avg_sq / (1 - BETAS[1] ** t)).sqrt() + EPS)
        if scale_type == "tensor":
            s = r_tilde.norm() / (r.norm() + 1e-8)
        else:
            dim = 0 if left else 1
            s = r_tilde.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        u = g * s
        if gamma is not None and previous is not None and u.norm() > gamma * previous:
            u = u * (gamma * previous / u.norm())
        previous = u.norm()
        w = (1 - LR * DECAY) * w - LR * alpha * u
    return w


CASES = {"apollo-wide": ((24, 40), 6, "channel", 1.0), "apollo-tall": ((40, 24), 6, "channel", 1.0),
         "mini-wide": ((24, 40), 1, "tensor", math.sqrt(128)), "mini-tall": ((40, 24), 1, "tensor", math.sqrt(128))}


@pytest.mark.parametrize("limiter", [1.01, None], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_papers_update_rule_in_fp64(case: str, limiter: float | None) -> None:
    """8 steps, projection renewed every 3 (steps 1, 4, 7 draw new seeds): the fp32 optimizer stays within
    2e-6 of the fp64 rule, relative to how far the weights moved (fp32 rounding is 6e-8 per operation)."""
    shape, rank, scale_type, alpha = CASES[case]
    w0 = 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(3))  # small: its own ulps stay small
    w = torch.nn.Parameter(w0.clone())
    opt = ApolloAdamW([{"params": [w], "rank": rank, "weight_decay": DECAY}], lr=LR, betas=BETAS, eps=EPS,
                      update_gap=GAP, scale=alpha, scale_type=scale_type, norm_growth_limit=limiter)
    opt.param_names = {w: "layer.weight"}
    seeds = []
    for g in gradients(shape, STEPS):
        w.grad = g.clone()
        opt.step()
        seeds.append(int(opt.state[w]["proj_seed"]))
    assert seeds == [projection_seed(GAP * (t // GAP), shape, "layer.weight") for t in range(STEPS)]
    assert len(set(seeds)) == 3  # renewed at steps 0, 3, 6 (0-based)
    want = reference(w0, gradients(shape, STEPS), seeds, rank, scale_type, alpha, limiter)
    moved = (want - w0.double()).abs().max()
    error = (w.detach().double() - want).abs().max()
    assert moved > 0.02
    assert error <= 2e-6 * moved, (float(error), float(moved))


def update_norms(limiter: float | None, shape: tuple[int, int] = (24, 40), steps: int = 8) -> list[float]:
    """||U_t|| of each step (lr 1, alpha 1, no decay: the weight's change is the update)."""
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ApolloAdamW([{"params": [w], "rank": 1}], lr=1.0, betas=BETAS, update_gap=100, scale=1.0,
                      scale_type="tensor", norm_growth_limit=limiter)
    gen = torch.Generator().manual_seed(11)
    norms = []
    for t in range(steps):
        before = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen) * (1 + 3 * (t % 3 == 2))  # a spike every third step
        opt.step()
        norms.append(float((w.detach() - before).norm()))
    return norms


def test_the_limiter_caps_growth_at_gamma() -> None:
    """Without the limiter some update grows by more than 1.01x over the previous; with it none does, and the
    capped ones grow by exactly 1.01x."""
    free, capped = update_norms(None), update_norms(1.01)
    assert max(b / a for a, b in zip(free, free[1:])) > 1.05
    ratios = [b / a for a, b in zip(capped, capped[1:])]
    assert max(ratios) <= 1.01 * (1 + 1e-5)
    assert any(r == pytest.approx(1.01, rel=1e-5) for r in ratios)


def test_projection_is_regenerated_from_the_seed_never_stored() -> None:
    """The state of a target holds a step, an int64 seed, the limiter's norm and two low-rank moments; no tensor
    of the projection's size. The projection is N(0, 1/r) and the same for the same seed on every call."""
    w = torch.nn.Parameter(torch.randn(64, 96))
    opt = ApolloAdamW([{"params": [w], "rank": 8}], lr=1e-3)
    w.grad = torch.randn(64, 96)
    opt.step()
    state = opt.state[w]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "proj_seed", "scaled_norm", "step"]
    assert state["proj_seed"].dtype == torch.int64 and state["proj_seed"].dim() == 0
    assert tuple(state["exp_avg"].shape) == (8, 96)
    assert state_bytes(opt) == 8 + 8 + 4 + 2 * 4 * 8 * 96 == expected_state_bytes((64, 96), 8)
    seed = int(state["proj_seed"])
    p = random_projection(64, 8, seed, torch.device("cpu"))
    assert torch.equal(p, random_projection(64, 8, seed, torch.device("cpu")))
    big = random_projection(4096, 16, 1, torch.device("cpu"))
    assert big.var().item() == pytest.approx(1 / 16, rel=0.02)


def test_apollo_mini_state_is_sgd_like() -> None:
    """APOLLO-Mini on a Llama: the targets' state is two 1 x n vectors each; against AdamW's 2 mn the whole state
    shrinks to the plain-AdamW tensors' (embeddings, norms) plus a few KB."""

    model = small_llama()
    cfg = OptimizerConfig(name="apollo_mini", lr=1e-3)
    opt = build_lowrank(model, cfg, shard_state=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    groups, names = lowrank_param_groups(model, cfg, announce=False)
    targets = groups[0]["params"]
    target_state = sum(t.numel() * t.element_size() for p in targets for t in opt.state[p].values())
    assert target_state == sum(20 + 2 * 4 * max(p.shape) for p in targets)  # rank 1 on the smaller side
    defaults = lowrank_defaults(cfg)
    assert state_bytes(opt) == sum(state_cost(p, {**defaults, **g}) for g in groups for p in g["params"])
    adamw = sum(8 * p.numel() for p in targets)
    assert target_state < adamw / 50


def test_state_round_trips_and_continues_bitwise() -> None:
    """Saved and loaded with weights_only=True between two projection renewals: the continued run equals the
    uninterrupted one bit for bit; a changed rank is refused."""
    def make(rank: int = 4) -> tuple[torch.nn.Parameter, ApolloAdamW]:
        w = torch.nn.Parameter(torch.randn(32, 48, generator=torch.Generator().manual_seed(0)))
        opt = ApolloAdamW([{"params": [w], "rank": rank}], lr=1e-2, update_gap=3)
        opt.param_names = {w: "w"}
        return w, opt

    grads = gradients((32, 48), 8)
    w, opt = make()
    for g in grads[:4]:
        w.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": w.detach(), "opt": opt.state_dict()}, buf)
    for g in grads[4:]:
        w.grad = g.clone()
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w2, opt2 = make()
    w2.data.copy_(saved["w"])
    opt2.load_state_dict(saved["opt"])
    for g in grads[4:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w, w2)
    _, opt3 = make(rank=8)
    with pytest.raises(ValueError, match="APOLLO state of w.*rank 8.*saved with another rank"):
        opt3.load_state_dict(saved["opt"])


def test_presets_by_name_and_overrides() -> None:
    mini = lowrank_defaults(OptimizerConfig(name="apollo_mini"))
    assert (mini["scale_type"], mini["scale"]) == ("tensor", pytest.approx(math.sqrt(128)))
    full = lowrank_defaults(OptimizerConfig(name="apollo_adamw", apollo=ApolloConfig(scale=2.0)))
    assert (full["scale_type"], full["scale"], full["norm_growth_limit"]) == ("channel", 2.0, 1.01)


RULES = {
    "deepspeed": (["optimizer.name=apollo_mini", "distributed.engine=deepspeed"], "optimizer.name = 'apollo_mini'",
                  "APOLLO needs whole weight matrices.*distributed.zero_stage: 1"),
    "per-layer-elsewhere": (["optimizer.name=galore_adamw", "optimizer.apollo.per_layer=true"],
                            "optimizer.apollo.per_layer", "built for APOLLO"),
    "per-layer-zero1": (["optimizer.name=apollo_adamw", "optimizer.apollo.rank=16", "optimizer.apollo.per_layer=true",
                         "distributed.zero_stage=1"], "optimizer.apollo.per_layer", "choose one"),
    "rank": (["optimizer.name=apollo_adamw"], "optimizer.apollo.rank", "no target matrix.*largest smaller side is 128"),
    "int8-adamw": (["precision.weights=int8"], "precision.weights", "use optimizer.name: apollo_mini"),
    "nonfinite": (["optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true", "train.max_nonfinite_steps=2"],
                  "train.max_nonfinite_steps", "per-layer updates change each weight"),
}


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_recipe_rules(rule: str) -> None:
    extra, key, why = RULES[rule]
    with pytest.raises(ConfigError) as e:
        resolve(QUICKSTART, extra)
    assert key in str(e.value)
    assert any(re.search(why, p.render()) for p in e.value.problems), str(e.value)


def test_int8_weights_refused_on_several_processes_accepted_on_one() -> None:
    args = ["optimizer.name=apollo_mini", "precision.weights=int8", "optimizer.apollo.per_layer=true"]
    assert resolve(QUICKSTART, args).recipe.precision.weights == "int8"
    with pytest.raises(ConfigError, match="INT8 weights run in one process"):
        resolve(QUICKSTART, args, world_size=2)
