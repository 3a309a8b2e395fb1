"""The memory plan's vocabulary: the model's shapes as the plan sees them, the plan's typed lines, and the plan.

Nothing here computes a byte: the formulas live in the rooms that know them (plan/optimizer_state.py,
plan/activations.py, and each engine's spec for what it shards and stores). A line is found by its `Kind`, never by
its label: labels are for people and may change freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

GiB = 2**30
Where = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts model's experts as the plan counts them (plan/shapes.py finds them)."""

    layers: int  # decoder layers whose MLP is a mixture of experts
    count: int  # experts per such layer
    active: int  # experts each token goes through (top-k)
    intermediate: int  # one expert's intermediate size
    parameters: int  # the weights of every expert of every layer
    router_parameters: int  # the routers' weights, every layer

    @property
    def inactive_parameters(self) -> int:
        """Expert weights a token does not go through."""
        return self.parameters * (self.count - self.active) // self.count


@dataclass
class Shapes:
    """What the plan needs to know about the architecture (plan/shapes.py builds it on the meta device)."""

    model_type: str
    params: list[Param]
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    linear_names: set[str]  # module names of nn.Linear layers (LoRA / quantization targets)
    meta: Any = None  # the model on the meta device: the adapter and GaLore rules select from it
    experts: Experts | None = None  # a mixture-of-experts model's experts
    qk_norm: bool = False  # attention normalizes queries and keys (Qwen3, OLMo 2): saves more for backward

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def active(self) -> int:
        """Parameters one token goes through: all, less the experts it is not routed to."""
        return self.total - (self.experts.inactive_parameters if self.experts else 0)


class Kind(Enum):
    """What a line of the plan counts."""

    WEIGHTS = "weights"  # the model's own weights: trained, frozen (an adapter run's base) or INT8
    GATHERED_WEIGHTS = "gathered weights"  # ZeRO-3: partitions gathered whole while a module computes
    GRADIENTS = "gradients"
    MASTER_WEIGHTS = "master weights"  # fp32 copies an engine keeps beside bf16/fp16 weights
    OPTIMIZER_STATE = "optimizer state"
    ACTIVATIONS = "activations"
    OFFLOADED_ACTIVATIONS = "offloaded activations"  # model.activation_offload: in pinned CPU memory
    ATTENTION_MASKS = "attention masks"
    LOGITS = "logits"
    REFERENCE = "reference"  # a preference run's reference forward (no_grad): its logits, before the policy's
    MLP_TILE = "MLP tile"  # model.tiled_mlp: the one tile of an MLP computed at a time
    EXCHANGE = "all-to-all buffers"  # sequence parallelism: one attention layer's exchange
    CAST_COPIES = "cast copies"  # autocast's bf16/fp16 copies of fp32 weights
    DEQUANTIZED = "dequantized"  # an INT8 layer dequantized inside one matmul
    STEP_TEMPORARIES = "step temporaries"
    ALLOWANCE = "allowance"  # CUDA context and allocator fragmentation


@dataclass
class Item:
    """One line of the plan."""

    kind: Kind
    name: str
    bytes: int
    where: Where = "gpu"
    note: str = ""


@dataclass(frozen=True)
class ModelStates:
    """Weights, gradients, optimizer state and master copies of one rank, as the engine keeps them."""

    items: list[Item]
    trainable: int  # trainable parameters (an adapter run: the adapters')


@dataclass(frozen=True)
class CheckpointSize:
    total: int  # one checkpoint on disk, all ranks together
    rank0: int  # the part of it rank 0 writes (and fsyncs and hashes)


@dataclass(frozen=True)
class Suggestion:
    """A combination of changes and what the plan predicts with it."""

    label: str  # the changes, joined with ' + '
    changes: tuple[str, ...]  # each change's label
    overrides: tuple[str, ...]  # dotted overrides to paste
    peak_bytes: int
    fits: bool
    cpu_bytes: int  # per rank, in CPU memory


@dataclass
class Plan:
    world_size: int
    gpu_bytes: int
    items: list[Item]
    peak_bytes: int
    phase: str
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    parameters: int
    trainable: int
    offloaded_activations: int = 0
    active_parameters: int = 0  # per token: a mixture-of-experts model's parameters less the experts not used
    experts: Experts | None = None  # model.activation_offload: per micro-batch, in pinned CPU memory
    checkpoint: CheckpointSize = CheckpointSize(total=0, rank0=0)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes

    def bytes_of(self, kind: Kind, where: Where | None = None) -> int:
        """The bytes of every line of one kind (on one side, if given)."""
        return sum(i.bytes for i in self.items if i.kind is kind and (where is None or i.where == where))

    @property
    def cpu_bytes(self) -> int:
        """What the plan puts in CPU memory, per rank (offloaded optimizer state, parameters, activations)."""
        return sum(i.bytes for i in self.items if i.where == "cpu")
