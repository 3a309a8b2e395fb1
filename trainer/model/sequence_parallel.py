"""Sequence parallelism (Ulysses, as in DeepSpeed's Arctic Long Sequence Training): the ranks of a group share
one batch of sequences, each holding seq_len / N consecutive tokens of every row through the whole model.

Everything outside attention works token by token, so a rank computes its own tokens alone: embeddings, norms,
MLPs, the LM head and the loss. Attention needs every token of a row, and gets it by exchanging heads for
tokens: before attention one all-to-all turns [batch, heads, seq_len / N] queries, keys and values into
[batch, heads / N, seq_len] (each rank attends over the whole sequence with its share of the heads), after it a
second all-to-all turns the output back. Hence heads (and key/value heads) must divide by N, and seq_len too.

Positions: the model is given each rank's slice of the row's global position ids, so RoPE is the unsharded one.
Masks: attention is rebuilt here from the WHOLE row's position ids and padding (`SequenceLayout`, handed down
to attention as a keyword argument of the model's forward, which survives gradient checkpointing's recompute):
documents packed into a row (positions restarting) see only themselves, exactly as without sequence parallelism.
DeepSpeed's own sdpa path drops the mask, which would let packed documents see each other. With
flash_attention_2 the whole row's position ids go to transformers' varlen path instead of a mask.

The exchange is `all_to_all_single`, differentiable here (its backward is the reverse exchange), and runs on gloo,
so all of this is tested on CPU ranks. Which ranks form a group: consecutive ranks (one node, fastest links).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.engine.deepspeed_spec import SEQUENCE_PARALLEL_ATTENTION

ATTENTION_PREFIX = "trainer_sequence_parallel_"  # + the core implementation it wraps (sdpa, eager, flash_...)
CORES = SEQUENCE_PARALLEL_ATTENTION  # the implementations it wraps (the DeepSpeed spec refuses the others)


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: `size` ranks, this one at `index` (its slice of every row)."""

    size: int
    index: int
    group: Any  # the torch.distributed process group of these ranks

    def columns(self, seq_len: int) -> slice:
        """The token positions of a row this rank computes."""
        local = seq_len // self.size
        return slice(self.index * local, (self.index + 1) * local)


def sequence_group(size: int) -> SequenceGroup:
    """Split the world into groups of `size` consecutive ranks and return this rank's (a collective: every rank
    calls it once, and creates every group, as torch.distributed requires)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world % size == 0, f"world size {world} is not a multiple of sequence_parallel {size} (validated)"
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceGroup(size, rank % size, mine)


@dataclass
class SequenceLayout:
    """The whole rows behind the slices one forward computes: what attention needs to mask them as a whole."""

    group: SequenceGroup
    positions: Tensor  # [batch, seq_len] global position ids (restarting at each packed document)
    keys_valid: Tensor | None  # [batch, seq_len] bool, False at padding (None: no padding)
    _masks: dict[str, Tensor | None] = field(default_factory=dict)

    def documents(self) -> Tensor | None:
        """[batch, seq_len] the document index of each token, None when every row is one document: a new one
        starts wherever the positions do not go up by one (transformers' rule for packed rows)."""
        step = torch.diff(self.positions, dim=-1, prepend=self.positions[:, :1] - 1)
        starts = (step != 1).cumsum(-1)
        return None if bool((starts[:, -1] == 0).all()) else starts

    def mask(self, core: str, dtype: torch.dtype) -> Tensor | None:
        """The [batch, 1, seq_len, seq_len] attention mask of the whole rows (computed once per forward), or None
        when causal attention over the whole row is the mask (then the kernels' causal path runs, no mask)."""
        key = f"{core}:{dtype}"
        if key not in self._masks:
            self._masks[key] = self._build(core, dtype)
        return self._masks[key]

    def _build(self, core: str, dtype: torch.dtype) -> Tensor | None:
        docs = self.documents()
        if docs is None and self.keys_valid is None:
            return None
        n = self.positions.size(1)
        device = self.positions.device
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(self.positions.size(0), n, n)
        if docs is not None:
            allowed = allowed & (docs.unsqueeze(2) == docs.unsqueeze(1))
        if self.keys_valid is not None:  # a query that would see no key at all (an empty softmax) sees itself
            allowed = allowed & self.keys_valid.unsqueeze(1)
            allowed = allowed | (torch.eye(n, dtype=torch.bool, device=device) & ~allowed.any(-1, keepdim=True))
        allowed = allowed.unsqueeze(1)
        if core == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


class _AllToAll(torch.autograd.Function):
    """Exchange dim-0 chunks among the group's ranks (chunk j goes to rank j); backward exchanges them back."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # (of a contiguous x: empty_like keeps the strides of a permuted one)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def heads_to_sequence(x: Tensor, group: SequenceGroup) -> Tensor:
    """[batch, heads, seq_len / N, dim] on each rank -> [batch, heads / N, seq_len, dim]."""
    b, h, s, d = x.shape
    n = group.size
    send = x.reshape(b, n, h // n, s, d).transpose(0, 1)  # chunk j: the heads rank j attends with
    got = _AllToAll.apply(send, group.group)  # chunk j: rank j's tokens of this rank's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def sequence_to_heads(x: Tensor, group: SequenceGroup) -> Tensor:
    """Attention's output [batch, seq_len, heads / N, dim] -> [batch, seq_len / N, heads, dim] (the inverse)."""
    b, s_all, h_local, d = x.shape
    n = group.size
    s = s_all // n
    send = x.reshape(b, n, s, h_local, d).transpose(0, 1)  # chunk j: rank j's tokens
    got = _AllToAll.apply(send, group.group)  # chunk j: this rank's tokens of rank j's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, s, n * h_local, d)


def _core_attention(core: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward if core == "eager" else ALL_ATTENTION_FUNCTIONS[core]


def _attention_for(core: str) -> Any:
    """The attention function registered with transformers for one core implementation."""

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *args: Any, sequence_layout: SequenceLayout | None = None, **kwargs: Any) -> tuple[Tensor, Any]:
        if sequence_layout is None:  # a forward outside the engine (inspection, export): plain attention
            return _core_attention(core)(module, query, key, value, attention_mask, *args, **kwargs)
        group = sequence_layout.group
        q, k, v = (heads_to_sequence(t, group) for t in (query, key, value))
        if core == "flash_attention_2":  # the varlen path finds the documents in the whole row's positions
            kwargs["position_ids"] = sequence_layout.positions
            mask = None
        else:
            kwargs.pop("position_ids", None)
            mask = sequence_layout.mask(core, q.dtype)
        out, weights = _core_attention(core)(module, q, k, v, mask, *args, **kwargs)
        return sequence_to_heads(out, group), weights

    return attention


def use_sequence_parallel_attention(model: nn.Module) -> str:
    """Route the model's attention through the exchange (the core it used before runs in the middle). Returns
    the core implementation's name. transformers builds no mask for an attention it does not know: the mask of
    the whole rows is made here instead."""
    from transformers import AttentionInterface

    config = model.config
    core = getattr(config, "_attn_implementation", None) or "sdpa"
    if core.startswith(ATTENTION_PREFIX):
        return core[len(ATTENTION_PREFIX):]
    if core not in CORES:
        raise ValueError(f"sequence parallelism wraps {', '.join(CORES)} attention, not {core}")
    name = ATTENTION_PREFIX + core
    AttentionInterface.register(name, _attention_for(core))
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == core:
            sub._attn_implementation = name
    return core


@dataclass(frozen=True)
class ShardedInputs:
    """One rank's slice of a micro-batch, and which columns of the rows it is."""

    kwargs: dict[str, Any]  # the model's keyword arguments
    columns: slice


def shard_inputs(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                 group: SequenceGroup) -> ShardedInputs:
    """This rank's tokens of every row, with their global positions; attention gets the whole rows' layout.
    Rows shorter than a multiple of the group (a batch of packed rows is as long as its longest) are padded at
    the end with tokens no real token sees and whose columns carry no label (`token_loss_sum` pads the labels)."""
    rows, width = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(width, device=input_ids.device).expand(rows, width)
    extra = -width % group.size
    if extra:
        input_ids = torch.nn.functional.pad(input_ids, (0, extra))
        if attention_mask is not None:  # padding: positions go on, the keys are masked
            attention_mask = torch.nn.functional.pad(attention_mask, (0, extra))
            tail = torch.arange(width, width + extra, device=input_ids.device)
        else:  # packed rows: the padding is a document of its own (positions restart)
            tail = torch.arange(extra, device=input_ids.device)
        position_ids = torch.cat([position_ids, tail.expand(rows, extra)], dim=1)
    keys_valid = None
    if attention_mask is not None and not bool(attention_mask.all()):
        keys_valid = attention_mask.bool()
    cols = group.columns(width + extra)
    layout = SequenceLayout(group, position_ids, keys_valid)
    kwargs = {"input_ids": input_ids[:, cols], "position_ids": position_ids[:, cols].contiguous(),
              "attention_mask": None, "sequence_layout": layout}
    return ShardedInputs(kwargs, cols)
