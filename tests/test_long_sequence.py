"""Tiled MLP (trainer/model/tiled_mlp.py): the same loss and gradients as the untiled model, also for a sequence
the tile count does not divide and under gradient checkpointing, with the intermediate activations of one tile
alive at a time; model.tiled_mlp resolved (auto) from the sequence each rank computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import QUICKSTART, small_llama, tiny
from trainer.model.loss import head_into_loss, token_loss_sum
from trainer.model.tiled_mlp import dense_mlps, tile_mlps
from trainer.recipe.resolve import resolve


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seq_len", [32, 29], ids=["divisible", "not-divisible"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(seq_len: int, checkpointing: bool) -> None:
    ids = torch.randint(0, 300, (2, seq_len), generator=torch.Generator().manual_seed(1))
    plain = small_llama()
    want_loss, want = loss_and_grads(plain, ids)
    tiled = small_llama()  # the same seed: the same weights
    if checkpointing:
        tiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert tile_mlps(tiled, 4) == 2  # both layers' MLPs
    got_loss, got = loss_and_grads(tiled, ids)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert set(tiled.state_dict()) == set(plain.state_dict())  # nothing renamed: checkpoints and export unchanged


def test_only_one_tile_of_the_mlp_intermediates_is_alive() -> None:
    """The activations saved for backward inside an MLP: untiled, the whole sequence's gate/up products; tiled
    in 4, only each tile's input (views of the layer input, no new memory), the intermediates recomputed later."""
    def saved_bytes(model: torch.nn.Module) -> int:
        mlp = dense_mlps(model)[0]
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size() if t.untyped_storage().data_ptr() not in seen else 0
            seen.add(t.untyped_storage().data_ptr())
            return t

        seen: set[int] = set()
        x = torch.randn(1, 64, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x)
        return total[0]

    plain = saved_bytes(small_llama())
    tiled_model = small_llama()
    tile_mlps(tiled_model, 4)
    tiled = saved_bytes(tiled_model)
    assert tiled * 4 < plain, (tiled, plain)


def test_auto_tiles_follow_the_tokens_each_rank_computes(tmp_path: Path) -> None:
    one = resolve(QUICKSTART, tiny(tmp_path, "model.tiled_mlp=auto", "data.seq_len=256"))
    assert one.mlp_tiles == 4  # 256 tokens / hidden 64
    shared = resolve(QUICKSTART, tiny(tmp_path, "model.tiled_mlp=auto", "data.seq_len=256",
                                      "distributed.engine=deepspeed", "distributed.zero_stage=2",
                                      "distributed.sequence_parallel=2"), world_size=2)
    assert shared.mlp_tiles == 2  # each rank computes 128 of the 256 tokens
    assert resolve(QUICKSTART, tiny(tmp_path, "model.tiled_mlp=3")).mlp_tiles == 3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_head_in_loss_gives_the_loss_and_gradients_of_the_logits(dtype: str, tie: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """model.head_in_loss: the head applied chunk by chunk inside the loss (chunks of 7 rows here, so several)
    equals the model's own logits through the loss, weights of the head (tied to the embeddings or not) included."""
    import trainer.model.loss as loss_module

    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", 7 * 300)
    monkeypatch.setattr(loss_module, "HEAD_MIN_ROWS", 1)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run(model: torch.nn.Module, head: torch.Tensor | None) -> tuple[float, dict[str, torch.Tensor]]:
        with autocast:
            out = model(input_ids=ids, use_cache=False).logits
            loss = token_loss_sum(out, ids, None, head)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = run(small_llama(tie), None)
    fused = small_llama(tie)
    head = head_into_loss(fused)
    got_loss, got = run(fused, head)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert got_loss == pytest.approx(want_loss, rel=tol)
    assert got.keys() == want.keys()
    for name in want:  # bf16: the reference rounds the head's weight gradient to bf16 in one matmul, the chunks
        # accumulate it in fp32: they differ by up to 0.21% of the largest entry (measured, tied embeddings)
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * scale / 4, msg=name)
