"""GaLore through the real loop: per-layer updates equal standard GaLore (with accumulation; under DDP and
sharded on 2 processes: tests/test_lowrank_ddp.py), the per-layer clipping rule, no full set of gradients,
bitwise resume between two projector refreshes with 8-bit moments, and the loss against AdamW on Shakespeare."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import GALORE, QUICKSTART, killed_at_8_resumes_bitwise, max_diff, tiny, train_in_process, weights_of
from trainer.checkpoint.layout import complete_checkpoints
from trainer.distributed import distributed_context
from trainer.run.loop import Training, setup, token_loss_sum
from trainer.optim.per_layer import PerLayerUpdates
from trainer.recipe.resolve import resolve
from trainer.safeio import load_tensors


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [["train.micro_batch_size=4", "train.grad_accum_steps=1"],
                                   ["train.micro_batch_size=1", "train.grad_accum_steps=4"]], ids=["accum1", "accum4"])
def test_per_layer_equals_standard_galore(tmp_path: Path, batch: list[str]) -> None:
    """fp32, 10 steps: updates inside backward (low-rank accumulation between micro-steps) give the same
    parameters as one optimizer step after backward."""
    common = [*GALORE, "optimizer.grad_clip=null", *batch]
    std, std_rows, start = train_in_process([*common, f"output_dir={tmp_path / 'std'}"])
    per, per_rows, _ = train_in_process([*common, "optimizer.galore.per_layer=true", f"output_dir={tmp_path / 'pl'}"])
    assert max_diff(std, per) <= 1e-5
    assert max_diff(std, start) > 1e-2  # the runs trained
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(std_rows, per_rows))
    assert [r["lr"] for r in std_rows] == [r["lr"] for r in per_rows]  # one schedule step per optimizer step


def reference_clipped_run(run: Training, clip: float, steps: int) -> list[float]:
    """The per-layer clipping rule written out over a standard run: every consumed gradient x_p (projected
    for targets) is scaled by min(min(1, clip / previous step's norm), clip / |x_p|). Returns the norms."""
    engine, opt, norms = run.engine, run.engine.optimizer, []
    position = run.state.position
    for _ in range(steps):
        batches, position = run.data.step_batches(position)
        tokens = sum(b.num_loss_tokens() for b in batches)
        for b in batches:
            logits = engine.forward(**b.model_inputs(torch.device("cpu"))).logits
            engine.backward(token_loss_sum(logits, b.labels) / tokens)
        factor = 1.0 if not norms else min(1.0, clip / (norms[-1] + 1e-6))
        total = 0.0
        with torch.no_grad():
            for p in [p for p in engine.module.parameters() if p.grad is not None][::-1]:
                if opt.is_target(p) and opt.needs_full_gradient(p):
                    opt.refresh(p, p.grad)
                x = opt.project(p, p.grad)
                n = float(torch.linalg.vector_norm(x, dtype=torch.float64))
                total += n * n
                opt.apply_update(p, x * min(factor, clip / (n + 1e-6)))
                p.grad = None
        norms.append(math.sqrt(total))
        with warnings.catch_warnings():  # optimizer.step() is never called here, by design
            warnings.simplefilter("ignore", UserWarning)
            engine.scheduler.step()
    return norms


@pytest.mark.slow
def test_per_layer_clipping_rule(tmp_path: Path) -> None:
    """With grad_clip active, per-layer updates follow the documented rule (previous step's norm, and no
    parameter above the clip on its own) and report this step's norm before clipping."""
    clip, steps = 0.5, 6
    per, rows, _ = train_in_process([*GALORE, f"optimizer.grad_clip={clip}", "optimizer.galore.per_layer=true",
                                  f"output_dir={tmp_path / 'pl'}"], steps=steps)
    cfg = resolve(QUICKSTART, [*tiny(tmp_path / "ref", steps=steps), *GALORE, "optimizer.grad_clip=null"])
    with distributed_context() as dist:
        run = setup(cfg, dist)
        norms = reference_clipped_run(run, clip, steps)
        ref = weights_of(run)
        run.metrics.close()
    assert min(norms) > 2 * clip  # clipping acted on every step
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-5)
    assert max_diff(per, ref) <= 1e-5


@pytest.mark.slow
def test_per_layer_never_holds_a_full_set_of_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted at every hook: with one micro-step only the gradient being applied exists; with
    accumulation, targets keep no full-size gradient between micro-steps except on a refresh step."""
    seen: list[tuple[bool, bool, int, int]] = []
    original = PerLayerUpdates._on_grad

    def spy(self: PerLayerUpdates, p: torch.Tensor) -> None:
        params = self.order
        live = sum(q.grad is not None for q in params)
        live_targets = sum(q.grad is not None for q in params if self.optimizer.is_target(q))
        seen.append((self.is_last, self.optimizer.needs_full_gradient(p), live, live_targets))
        original(self, p)

    monkeypatch.setattr(PerLayerUpdates, "_on_grad", spy)
    train_in_process([*GALORE, "optimizer.galore.per_layer=true", f"output_dir={tmp_path / 'a'}"], steps=3)
    assert seen and max(live for *_, live, _ in seen) == 1
    seen.clear()
    train_in_process([*GALORE, "optimizer.galore.per_layer=true", "train.micro_batch_size=2",
                      "train.grad_accum_steps=2", f"output_dir={tmp_path / 'b'}"], steps=3)
    n_targets = 14
    plain = [t for last, full, _, t in seen if not full]
    assert plain and max(plain) <= 1  # non-refresh steps: only the target being folded/applied
    assert max(t for *_, t in seen) == n_targets  # step 1 refreshes: summed gradients are needed


# --- resume with 8-bit moments (the 2-process tests of the family: tests/test_lowrank_ddp.py) ---------------

@pytest.mark.slow
def test_resume_8bit_per_layer_between_refreshes_is_bitwise_exact(tmp_path: Path) -> None:
    """8-bit moments, per-layer updates with accumulation and clipping (its previous-step norm is state),
    randomized SVD: killed after step 8, resumed from step 6, between the refreshes of steps 5 and 9."""
    extra = ["optimizer.name=galore_adamw8bit", "optimizer.galore.per_layer=true", "optimizer.galore.svd=randomized",
             "optimizer.grad_clip=0.5", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
    out = killed_at_8_resumes_bitwise(tmp_path, [*GALORE, *extra])
    state = load_tensors(complete_checkpoints(out)[-1][1] / "engine-state.pt")
    assert any(t.dtype == torch.uint8 for s in state["optimizer"]["state"].values() for t in s.values())


@pytest.mark.slow
def test_loss_within_10_percent_of_adamw_on_shakespeare(tmp_path: Path, data_dir: Path) -> None:
    """Same model, data, steps and learning rate; GaLore at rank hidden/4 (16 of 64). The loss is the mean
    of the last 5 steps."""
    common = [f"data.source={data_dir / 'shakespeare.txt'}", "data.max_bytes=10000000", "data.seq_len=128",
              "train.micro_batch_size=8", "model.config.intermediate_size=176", "optimizer.lr=3e-3",
              "optimizer.warmup_steps=5", "optimizer.galore.update_gap=20"]
    final = {}
    for name in ("adamw", "galore_adamw"):
        _, rows, _ = train_in_process([*common, f"optimizer.name={name}", "optimizer.galore.rank=16",
                                    f"output_dir={tmp_path / name}"], steps=60)
        final[name] = sum(r["loss"] for r in rows[-5:]) / 5
        assert final[name] < rows[0]["loss"] - 1.5  # both learned
    assert final["galore_adamw"] <= 1.10 * final["adamw"], final
