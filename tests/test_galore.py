"""GaLore: projector math, the target rule, state bytes against the formula, 8-bit moments, refresh failures,
checkpointable state, and the recipe rules. End-to-end runs (per-layer, DDP, sharding, resume, loss against
AdamW) are in tests/test_galore_train.py."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import QUICKSTART, small_llama
from trainer.errors import ConfigError
from trainer.optim.galore import (
    PROJ_TYPES,
    GaLoreAdamW,
    expected_state_bytes,
    project,
    project_back,
    projection_side,
    state_bytes,
    top_singular_vectors,
)
from trainer.optim.lowrank_groups import build_lowrank, lowrank_param_groups, select_targets, state_cost
from trainer.optim.sharded import partition
from trainer.recipe.resolve import resolve
from trainer.recipe.schema import GaloreConfig, OptimizerConfig

SHAPES = {"tall": (48, 20), "wide": (20, 48)}


pytestmark = pytest.mark.usefixtures("one_thread")


def galore_cfg(**galore: object) -> OptimizerConfig:
    return OptimizerConfig(name="galore_adamw", lr=1e-3, weight_decay=0.01, galore=GaloreConfig(**galore))


def projectors(matrix: torch.Tensor, rank: int, proj_type: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    side = projection_side(matrix.shape, proj_type)
    u, v = top_singular_vectors(matrix, rank, "full", 0)
    return (u if side in ("left", "both") else None), (v if side in ("right", "both") else None)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_projector_is_orthonormal_top_subspace_with_identities(shape: str, proj_type: str) -> None:
    m, n = SHAPES[shape]
    rank = 6
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    left, right = projectors(g, rank, proj_type)
    side = projection_side((m, n), proj_type)
    expected_side = {"std": "left" if m <= n else "right", "reverse_std": "right" if m <= n else "left",
                     "left": "left", "right": "right", "full": "both"}[proj_type]
    assert side == expected_side
    for p in (left, right):
        if p is not None:
            assert torch.allclose(p.T @ p, torch.eye(rank), atol=1e-5)  # orthonormal columns
    low = project(g, left, right)
    assert low.shape == {"left": (rank, n), "right": (m, rank), "both": (rank, rank)}[side]
    x = torch.randn(low.shape)
    assert torch.allclose(project(project_back(x, left, right), left, right), x, atol=1e-5)  # P^T P X = X
    back = project_back(low, left, right)
    assert torch.allclose(project(back, left, right), low, atol=1e-5)  # projecting twice changes nothing
    s = torch.linalg.svdvals(g)
    if side != "both":  # a one-sided rank-r projection keeps exactly the top r singular values' energy
        assert math.isclose(float(back.norm() ** 2), float((s[:rank] ** 2).sum()), rel_tol=1e-4)
    else:  # P^T G Q of the top singular pairs is diag(s[:r])
        assert torch.allclose(low.abs(), torch.diag(s[:rank]), atol=1e-4)


def test_randomized_svd_finds_the_subspace_seeded_and_leaves_the_rng_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(80, 5, generator=gen), torch.randn(5, 60, generator=gen)
    g = a @ b * 10 + 0.01 * torch.randn(80, 60, generator=gen)  # rank 5 plus noise
    exact, _ = top_singular_vectors(g, 5, "full", 0)
    before = torch.get_rng_state()
    fast, _ = top_singular_vectors(g, 5, "randomized", 123)
    assert torch.equal(torch.get_rng_state(), before)
    again, _ = top_singular_vectors(g, 5, "randomized", 123)
    assert torch.equal(fast, again)
    # same subspace: the projection of one basis onto the other keeps all its energy
    assert torch.linalg.matrix_norm(exact.T @ fast) ** 2 == pytest.approx(5.0, rel=1e-4)


def test_default_targets_are_attention_and_mlp_projections(caplog: pytest.LogCaptureFixture) -> None:
    model = small_llama()
    targets, small = select_targets(model, None, rank=8)
    kinds = sorted({name.split(".")[-2] for name in targets.values()})
    assert kinds == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(targets) == 14 and not small
    with caplog.at_level(logging.INFO):
        groups, _ = lowrank_param_groups(model, galore_cfg(rank=8))
    assert "GaLore rank 8 on 14 matrices (q_proj 2, k_proj 2" in caplog.text
    assert "plain AdamW on 7 tensors (embed_tokens 1, input_layernorm 2, post_attention_layernorm 2, norm 1, " \
           "lm_head 1)" in caplog.text
    assert [len(g["params"]) for g in groups] == [14, 2, 5]  # targets; embed + head; norms
    tied = select_targets(small_llama(tie=True), None, rank=8)[0]  # the head tied to the embeddings is no target
    assert len(tied) == 14


def test_target_patterns_too_small_matrices_and_unknown_names(caplog: pytest.LogCaptureFixture) -> None:
    model = small_llama()
    targets, small = select_targets(model, ["q_proj", "model.layers.1.mlp.*"], rank=8)
    assert sorted(targets.values()) == sorted(["model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.1.self_attn.q_proj.weight",
                                               "model.layers.1.mlp.down_proj.weight",
                                               "model.layers.1.mlp.gate_proj.weight",
                                               "model.layers.1.mlp.up_proj.weight"])
    targets, small = select_targets(model, None, rank=32)  # k/v are 32 x 64: projecting to 32 saves nothing
    assert len(targets) == 10 and sorted({n.split(".")[-2] for n in small.values()}) == ["k_proj", "v_proj"]
    with caplog.at_level(logging.WARNING):
        lowrank_param_groups(model, galore_cfg(rank=32))
    assert "4 matched matrices have a side <= optimizer.galore.rank=32" in caplog.text
    with pytest.raises(ValueError, match=r"qproj matches no module.*q_proj"):
        select_targets(model, ["q_proj", "qproj"], rank=8)
    with pytest.raises(ValueError, match=r"no target matrix.*rank 64.*largest smaller side is 64"):
        lowrank_param_groups(model, galore_cfg(rank=64))


def test_resolve_names_the_galore_keys() -> None:
    """The recipe errors for the same two mistakes: the key, the value, and the fix, before anything is built."""
    with pytest.raises(ConfigError, match=r"optimizer.galore.target_modules = \['q_proj', 'qproj'\].*qproj "
                                          r"matches no module.*q_proj"):
        resolve(QUICKSTART, ["optimizer.name=galore_adamw", "optimizer.galore.target_modules=[q_proj, qproj]",
                             "optimizer.galore.rank=8"])
    with pytest.raises(ConfigError, match=r"optimizer.galore.rank = 128 \(command line\): no target.*largest "
                                          r"smaller side is 128.*e.g. 32"):
        resolve(QUICKSTART, ["optimizer.name=galore_adamw", "optimizer.galore.rank=128"])


def formula_bytes(model: torch.nn.Module, targets: set[str], rank: int, proj_type: str, bits: int,
                  min_8bit: int) -> int:
    """The issue's formula, written out: per target (m x n) the projector (mr for a left projection) plus two
    low-rank moments (2nr), fp32, or 1 byte per element plus an fp32 absmax per 256 for 8-bit moments of at
    least `min_8bit` elements; plain AdamW (2 full moments) for the rest; an 8-byte float64 step per tensor."""
    def moment(numel: int) -> int:
        return numel + 4 * math.ceil(numel / 256) if bits == 8 and numel >= min_8bit else 4 * numel

    total = 0
    for name, p in model.named_parameters():
        total += 8
        if name not in targets:
            total += 2 * moment(p.numel())
            continue
        m, n = p.shape
        left = {"std": m <= n, "reverse_std": m > n, "left": True, "right": False}.get(proj_type)
        if left is None:  # full: both sides, r x r moments
            total += 4 * (m + n) * rank + 2 * moment(rank * rank)
        elif left:
            total += 4 * m * rank + 2 * moment(rank * n)
        else:
            total += 4 * n * rank + 2 * moment(m * rank)
    return total


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("rank", [8, 16])
def test_state_bytes_equal_the_formula(rank: int, bits: int) -> None:
    """Counted from the real state tensors after a step, for every proj_type; 8-bit with bitsandbytes'
    threshold (4096 elements: only embeddings and head quantize at this size) and with every moment
    quantized (threshold 256)."""
    model = small_llama()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for proj_type in PROJ_TYPES:
        for min_8bit in (4096, 256):
            groups, names = lowrank_param_groups(model, galore_cfg(rank=rank, proj_type=proj_type))
            opt = GaLoreAdamW(groups, lr=1e-3, proj_type=proj_type, bits=bits, min_8bit_size=min_8bit)
            opt.step()
            targets = {names[p] for p in groups[0]["params"]}
            expected = formula_bytes(model, targets, rank, proj_type, bits, min_8bit)
            assert state_bytes(opt) == expected, (proj_type, min_8bit)
            assert expected == sum(expected_state_bytes(tuple(p.shape), rank if names[p] in targets else None,
                                                        proj_type, bits, min_8bit) for p in model.parameters())
            if bits == 32 and proj_type == "std" and min_8bit == 4096:
                adamw = sum(8 * p.numel() for p in groups[0]["params"])
                assert sum(4 * t.numel() for p in groups[0]["params"] for t in opt.state[p].values()
                           if t.dim()) < adamw / 2  # the point of it


def test_8bit_moments_track_fp32_and_survive_zero_blocks() -> None:
    """Quantized moments give nearly the same trajectory; rows whose gradient is always zero (unused
    embedding rows) stay finite and (nearly) unmoved."""
    init = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    target = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    results = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(init.clone())
        emb = torch.nn.Parameter(torch.randn(300, 32, generator=torch.Generator().manual_seed(1)))
        start = emb.detach().clone()
        opt = GaLoreAdamW([{"params": [w], "rank": 16}, {"params": [emb]}], lr=1e-2, update_gap=5, bits=bits,
                          min_8bit_size=1024)
        for step in range(30):
            w.grad = w.detach() - target
            emb.grad = torch.zeros_like(emb)
            emb.grad[:100] = torch.randn(100, 32, generator=torch.Generator().manual_seed(3 + step))
            opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(emb).all()
        # rows 104+ fill whole 256-element blocks of zeros: exactly unmoved. Rows 100-103 share a block with
        # used rows, and bitsandbytes' CPU quantizer maps 0 to code 131 (2e-5 x absmax, not the exact zero
        # at 127; its own AdamW8bit does the same), so they creep by well under 1% of lr per step.
        assert torch.equal(emb[104:], start[104:]) and not torch.equal(emb[:100], start[:100])
        assert (emb[100:104] - start[100:104]).abs().max() < 0.01 * 1e-2 * 30
        if bits == 8:
            assert opt.state[w]["exp_avg"].dtype == torch.uint8 and opt.state[emb]["exp_avg_sq"].dtype == torch.uint8
        results[bits] = w.detach().clone()
    moved = (results[32] - init).norm()
    assert moved > 1.0
    assert (results[8] - results[32]).norm() < 0.05 * moved


def test_failed_refresh_keeps_projector_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """A NaN gradient makes LAPACK itself fail ("failed to converge ... non-finite values"): the projector
    of the previous refresh is kept, unchanged and finite. On a first refresh there is nothing to keep: a
    seeded random orthonormal basis is used."""
    w = torch.nn.Parameter(torch.randn(32, 48))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3, update_gap=2)
    opt.param_names = {w: "layer.weight"}
    for _ in range(2):
        w.grad = torch.randn(32, 48)
        opt.step()
    kept = opt.state[w]["proj_left"].clone()
    bad = torch.randn(32, 48)
    bad[3, 7] = float("nan")
    with caplog.at_level(logging.WARNING):
        opt.refresh(w, bad)  # step 2: a refresh is due
    assert torch.equal(opt.state[w]["proj_left"], kept) and opt.refresh_failures == 1
    assert "projector refresh of layer.weight at step 2 failed" in caplog.text
    assert "non-finite" in caplog.text and "keeping the previous projector" in caplog.text

    fresh = torch.nn.Parameter(torch.randn(32, 48))
    opt2 = GaLoreAdamW([{"params": [fresh], "rank": 4}], lr=1e-3)
    opt2.refresh(fresh, torch.full((32, 48), float("inf")))
    p = opt2.state[fresh]["proj_left"]
    assert torch.isfinite(p).all() and torch.allclose(p.T @ p, torch.eye(4), atol=1e-5)
    opt2.apply_update(fresh, opt2.project(fresh, torch.randn(32, 48)))
    assert torch.isfinite(fresh).all()


def test_state_round_trips_with_weights_only_and_continues_bitwise() -> None:
    """8-bit state saved and loaded with weights_only=True keeps its dtypes (torch's loader would cast uint8
    moments to the parameter's dtype) and continues exactly; a changed rank is refused with the key."""
    def make(rank: int = 8) -> tuple[torch.nn.Parameter, GaLoreAdamW]:
        w = torch.nn.Parameter(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)))
        return w, GaLoreAdamW([{"params": [w], "rank": rank}], lr=1e-2, update_gap=3, bits=8, min_8bit_size=256,
                              svd="randomized")

    grads = [torch.randn(64, 96, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    w, opt = make()
    for g in grads[:4]:
        w.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": w.detach(), "opt": opt.state_dict()}, buf)
    for g in grads[4:]:
        w.grad = g
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w2, opt2 = make()
    w2.data.copy_(saved["w"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[w2]["exp_avg"].dtype == torch.uint8
    for g in grads[4:]:
        w2.grad = g
        opt2.step()
    assert torch.equal(w, w2)
    w3, opt3 = make(rank=16)
    with pytest.raises(ValueError, match="rank 16.*saved with another rank"):
        opt3.load_state_dict(saved["opt"])


def test_builder_names_and_sharding_flag() -> None:
    cfg = OptimizerConfig(name="galore_adamw8bit", galore=GaloreConfig(rank=16))
    opt = build_lowrank(small_llama(), cfg, shard_state=False)
    assert isinstance(opt, GaLoreAdamW) and {g["bits"] for g in opt.param_groups} == {8}
    assert "model.layers.0.mlp.up_proj.weight" in opt.param_names.values()


RULES = {
    "deepspeed": (["distributed.engine=deepspeed"], "optimizer.name = 'galore_adamw'",
                  "DeepSpeed flattens and partitions parameters.*distributed.engine: native with "
                  "distributed.zero_stage: 1"),
    "fp16-per-layer": (["optimizer.galore.per_layer=true", "precision.dtype=fp16"], "optimizer.galore.per_layer",
                       "cannot be skipped; use precision.dtype: bf16"),
    "per-layer-zero1": (["optimizer.galore.per_layer=true", "distributed.zero_stage=1"],
                        "optimizer.galore.per_layer", "choose one"),
    "empty-targets": (["optimizer.galore.target_modules=[]"], "optimizer.galore.target_modules", "empty"),
    "native-zero2": (["distributed.zero_stage=2"], "distributed.zero_stage = 2",
                     "stages 2-3 need distributed.engine: deepspeed"),
}


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_recipe_rules(rule: str) -> None:
    extra, key, why = RULES[rule]
    with pytest.raises(ConfigError) as e:
        resolve(QUICKSTART, ["optimizer.name=galore_adamw", *extra])
    assert key in str(e.value)
    assert any(re.search(why, p.render()) for p in e.value.problems), str(e.value)


def test_recipe_rules_accept_galore_and_refuse_per_layer_without_it(tmp_path: Path) -> None:
    cfg = resolve(QUICKSTART, ["optimizer.name=galore_adamw8bit", "optimizer.galore.per_layer=true",
                               "optimizer.galore.rank=32", "precision.dtype=bf16", "distributed.zero_stage=0"]).recipe
    assert cfg.optimizer.galore.per_layer
    assert resolve(QUICKSTART, ["optimizer.name=galore_adamw", "optimizer.galore.rank=32", "distributed.zero_stage=1"])
    with pytest.raises(ConfigError, match="per-layer updates are built for the GaLore optimizers"):
        resolve(QUICKSTART, ["optimizer.name=adamw", "optimizer.galore.per_layer=true"])


def test_sharding_partition_balances_state_bytes_not_sizes() -> None:
    """Owners for distributed.zero_stage 1: largest state first, each to the least-loaded rank. On a GaLore
    model the embedding holds full AdamW state while a projected matrix of the same size holds a fraction;
    balancing bytes splits the real state evenly where balancing element counts would not."""
    assert partition([100, 60, 50, 40, 10], 2) == [0, 1, 1, 0, 1]  # loads 140 / 120
    model = small_llama(tie=True)
    groups, _ = lowrank_param_groups(model, galore_cfg(rank=8))
    flat = [(p, {"rank": None, "proj_type": "std", "bits": 32, "min_8bit_size": 4096, **g})
            for g in groups for p in g["params"]]
    costs = [state_cost(p, g) for p, g in flat]
    by_bytes, by_size = ([sum(c for c, o in zip(costs, partition(w, 2)) if o == r) for r in (0, 1)]
                         for w in (costs, [p.numel() for p, _ in flat]))
    assert max(by_bytes) == max(costs)  # the embedding alone on one rank: the best any whole-parameter split does
    assert max(by_size) > max(by_bytes) * 1.15, (by_size, by_bytes)
