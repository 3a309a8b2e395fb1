"""APOLLO and APOLLO-Mini against the paper's update rule (arXiv 2412.05270, Algorithm 1, with the norm-growth
limiter it takes from Fira) written here in fp64; the seed-only projection; state bytes against the formula;
exact resume of the optimizer state; the recipe rules. Runs through the real loop (per-layer, DDP, sharding,
resume, loss against AdamW) are in tests/test_apollo_train.py."""

from __future__ import annotations

import io
import logging
import math
import re

import pytest
import torch

from tests.helpers import QUICKSTART, small_llama
from trainer.errors import ConfigError
from trainer.optim.apollo import (
    ApolloAdamW,
    bias_correction,
    expected_state_bytes,
    projection_seed,
    random_projection,
)
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
    """The paper's rule in fp64 as apollo-torch 1.0.3 computes it, for W (m x n): P with N(0, 1/r) entries from
    the seed of the step, on the smaller side, the right one for a square matrix (R = P^T G, r x n, when m < n;
    R = G P, m x r, when m >= n); Adam moments of R; R~ = M / (sqrt(V) + eps) without bias correction; the
    scale per kept channel (columns of R for a left projection, rows for a right one) or per tensor,
    s = ||R~|| / (||R|| + 1e-8); U = G s; Fira's limiter on this uncorrected U: if ||U_t|| > gamma ||U_{t-1}||
    then U_t <- U_t gamma ||U_{t-1}|| / ||U_t||; then Adam's bias correction c_t = sqrt(1 - b2^t) / (1 - b1^t)
    multiplies the step: W <- (1 - lr wd) W - lr alpha c_t U. (eps: ours is added after the correction, as in
    torch's AdamW, i.e. eps sqrt(1 - b2^t) here; written so, the rule is ours exactly.)"""
    m, n = w0.shape
    left = m < n
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
        r_tilde = exp_avg / (exp_avg_sq.sqrt() + EPS * math.sqrt(1 - BETAS[1] ** t))
        if scale_type == "tensor":
            s = r_tilde.norm() / (r.norm() + 1e-8)
        else:
            dim = 0 if left else 1
            s = r_tilde.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        u = g * s
        if gamma is not None and previous is not None and u.norm() > gamma * previous:
            u = u * (gamma * previous / u.norm())
        previous = u.norm()
        correction = math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        w = (1 - LR * DECAY) * w - LR * alpha * correction * u
    return w


CASES = {"apollo-wide": ((24, 40), 6, "channel", 1.0), "apollo-tall": ((40, 24), 6, "channel", 1.0),
         "apollo-square": ((32, 32), 6, "channel", 1.0), "mini-wide": ((24, 40), 1, "tensor", math.sqrt(128)),
         "mini-tall": ((40, 24), 1, "tensor", math.sqrt(128)), "mini-square": ((32, 32), 1, "tensor", math.sqrt(128))}


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
    """||U_t|| of each step as the limiter measures it: the weight's change (lr 1, alpha 1, no decay) divided by
    Adam's bias correction of that step."""
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ApolloAdamW([{"params": [w], "rank": 1}], lr=1.0, betas=BETAS, update_gap=100, scale=1.0,
                      scale_type="tensor", norm_growth_limit=limiter)
    gen = torch.Generator().manual_seed(11)
    norms = []
    for t in range(1, steps + 1):
        before = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen) * (1 + 3 * (t % 3 == 0))  # a spike every third step
        opt.step()
        norms.append(float((w.detach() - before).norm()) / bias_correction(BETAS, t))
    return norms


def test_the_limiter_caps_growth_at_gamma() -> None:
    """Without the limiter some update grows by more than 1.01x over the previous; with it none does, and the
    capped ones grow by exactly 1.01x."""
    free, capped = update_norms(None), update_norms(1.01)
    assert max(b / a for a, b in zip(free, free[1:])) > 1.05
    ratios = [b / a for a, b in zip(capped, capped[1:])]
    assert max(ratios) <= 1.01 * (1 + 1e-5)
    assert any(r == pytest.approx(1.01, rel=1e-5) for r in ratios)


def test_the_limiter_measures_the_update_before_bias_correction() -> None:
    """apollo-torch's measuring point, by hand. With one gradient G on every step Adam's corrected direction is
    the same each step, so U_t with the correction in it never grows (a limiter measuring there would never
    act); without the correction U_t is that direction over c_t = sqrt(1 - b2^t) / (1 - b1^t), which grows
    while c_t falls. Measured there, the limiter lets through L_t = min(gamma L_{t-1}, 1 / c_t) (in units of
    the corrected update) and the weight moves c_t L_t: step t's move over step 1's is c_t L_t."""
    shape, gamma, steps = (24, 40), 1.01, 8
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ApolloAdamW([{"params": [w], "rank": 1}], lr=1.0, betas=BETAS, eps=1e-12, update_gap=100, scale=1.0,
                      scale_type="tensor", norm_growth_limit=gamma)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    moves = []
    for _ in range(steps):
        before = w.detach().clone()
        w.grad = grad.clone()
        opt.step()
        moves.append(float((w.detach() - before).norm()))
    want, let_through = [], None
    for t in range(1, steps + 1):
        c = bias_correction(BETAS, t)
        let_through = 1 / c if let_through is None else min(gamma * let_through, 1 / c)
        want.append(c * let_through)
    got = [m / moves[0] for m in moves]
    assert got == pytest.approx(want, rel=1e-5)
    assert min(got) < 0.8  # the limiter acted (after the correction every move would be 1)
    assert float(opt.state[w]["limiter_norm"]) == pytest.approx(moves[-1] / bias_correction(BETAS, steps), rel=1e-5)


def step_factors(shape: tuple[int, int], rank: int, scale_type: str) -> tuple[torch.Tensor, ApolloAdamW]:
    """U / G after one step on a gradient whose column 3 is 10x the rest: the scale each entry got."""
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ApolloAdamW([{"params": [w], "rank": rank}], lr=1.0, scale=1.0, scale_type=scale_type)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    grad[:, 3] *= 10
    w.grad = grad.clone()
    opt.step()
    return -w.detach() / grad, opt


def test_a_square_matrix_is_scaled_per_row_like_apollo_torch() -> None:
    """apollo-torch projects a square gradient on the right (G P, n x r) and scales its rows: each row of U / G is
    one number, the rows differ, and the 10x column gets its row's scale, not one of its own. Wide matrices
    keep one scale per column, tall ones per row; APOLLO-Mini's square moments are n x 1."""
    factors, opt = step_factors((32, 32), 4, "channel")
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), rtol=1e-5)
    assert factors[:, 0].std() > 0.05 * factors[:, 0].mean()
    assert tuple(opt.state[next(iter(opt.state))]["exp_avg"].shape) == (32, 4)
    wide, _ = step_factors((24, 40), 4, "channel")
    assert torch.allclose(wide, wide[:1].expand_as(wide), rtol=1e-5)
    assert wide[0, 3] < 0.5 * wide[0, 0]  # the 10x column's own scale
    tall, _ = step_factors((40, 24), 4, "channel")
    assert torch.allclose(tall, tall[:, :1].expand_as(tall), rtol=1e-5)
    _, mini = step_factors((32, 32), 1, "tensor")
    assert tuple(mini.state[next(iter(mini.state))]["exp_avg"].shape) == (32, 1)


def test_projection_is_regenerated_from_the_seed_never_stored() -> None:
    """The state of a target holds a step, an int64 seed, the limiter's norm and two low-rank moments; no tensor
    of the projection's size. The projection is N(0, 1/r) and the same for the same seed on every call."""
    w = torch.nn.Parameter(torch.randn(64, 96))
    opt = ApolloAdamW([{"params": [w], "rank": 8}], lr=1e-3)
    w.grad = torch.randn(64, 96)
    opt.step()
    state = opt.state[w]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "limiter_norm", "proj_seed", "step"]
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


OLD_CONVENTIONS = {"square_channels": "columns", "limiter_measures": "after_correction"}  # before issue 25


def square_and_wide(**conventions: str) -> tuple[list[torch.nn.Parameter], ApolloAdamW]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((32, 32), (24, 40))]
    opt = ApolloAdamW([{"params": params, "rank": 4}], lr=1e-2, update_gap=3, **conventions)
    opt.param_names = {params[0]: "square", params[1]: "wide"}
    return params, opt


def steps(params: list[torch.nn.Parameter], opt: ApolloAdamW, first: int, last: int) -> None:
    grads = [gradients((32, 32), 8), gradients((24, 40), 8)]
    for t in range(first, last):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()


def test_a_checkpoint_of_the_old_conventions_resumes_as_it_started(caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before issue 25 (square matrices scaled per column, the limiter measuring after the
    bias correction; its groups name neither) resumes in this version with the conventions its state was made
    with: the continued run equals the old optimizer's uninterrupted one bit for bit, and the log says which
    matrices keep what. A run of the new conventions differs, so the check can fail."""
    params, old = square_and_wide(**OLD_CONVENTIONS)
    steps(params, old, 0, 4)
    buf = io.BytesIO()
    torch.save({"weights": [p.detach() for p in params], "opt": old.state_dict()}, buf)
    steps(params, old, 4, 8)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    for group in saved["opt"]["param_groups"]:
        for key in OLD_CONVENTIONS:
            del group[key]
    resumed, new = square_and_wide()
    for p, w in zip(resumed, saved["weights"]):
        p.data.copy_(w)
    with caplog.at_level(logging.INFO, logger="trainer.optim.apollo"):
        new.load_state_dict(saved["opt"])
    steps(resumed, new, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert "1 square matrices (square, ...) resume with one scale per column" in caplog.text
    assert "2 matrices (square, ...) resume with the norm-growth limiter measuring after" in caplog.text
    fresh, fresh_opt = square_and_wide()
    steps(fresh, fresh_opt, 0, 8)
    assert not torch.equal(fresh[0], params[0]) and not torch.equal(fresh[1], params[1])


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
