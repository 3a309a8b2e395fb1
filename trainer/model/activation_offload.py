"""Activation offloading (model.activation_offload): the tensors autograd saves for backward go to host memory
during the forward and come back for the backward.

What moves: every saved tensor on the model's device of at least MIN_BYTES that is not a weight (parameters,
autocast's copies of them and views of either stay where they are). Saved tensors that view one storage (a layer's
input and its reshape for a matmul) share one host copy of it, so nothing moves twice. With gradient checkpointing
autograd saves only each decoder layer's input, plus what the final norm and the LM head keep: those move, and the
one layer being recomputed in backward stays on the GPU. Without checkpointing every saved activation moves.

On a GPU the copies go into pinned host buffers on a side CUDA stream, so they overlap with the forward's compute;
the caching allocator reuses a tensor's memory once its copy has finished (`record_stream`). In backward, fetching
a layer's tensors also starts fetching those of the layer before it (backward runs the layers in reverse), on the
side stream: one layer ahead. Pinned buffers are kept from one micro-batch to the next, so they are allocated once.

On a CPU-only run the "device" is host memory: the tensors are still copied into separate buffers and brought
back through the same bookkeeping, so the hooks run (and are tested), but memory does not change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)

MIN_BYTES = 1024  # smaller saved tensors stay: a copy costs more than it frees


@dataclass
class Moved:
    """A storage that went to host memory (bytes), for one or more saved tensors that view it."""

    layer: int  # the decoder layer that was running when it was saved (-1: before the first)
    host: torch.Tensor  # uint8, the storage's bytes
    device: torch.device
    copied: Any = None  # CUDA: the event after the copy to host
    fetched: torch.Tensor | None = None  # CUDA: the copy on its way back to the device
    arrived: Any = None  # CUDA: the event after that copy
    views: int = 0  # saved tensors that view this storage
    unpacked: int = 0  # how many of them backward has asked for: at `views`, the device copy is let go


class HostBuffers:
    """Host buffers kept between micro-batches (pinned on a GPU run), handed out by exact byte size. A buffer not
    used by the last micro-batch is dropped, so the pool follows the shapes actually seen."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.free: dict[int, list[torch.Tensor]] = {}
        self.lent: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        spare = self.free.get(nbytes)
        raw = spare.pop() if spare else torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.lent.append(raw)
        return raw

    def give_back_all(self) -> None:
        """Everything lent becomes free again; free buffers that were not lent this time are dropped."""
        self.free = {}
        for raw in self.lent:
            self.free.setdefault(raw.numel(), []).append(raw)
        self.lent = []

    @property
    def nbytes(self) -> int:
        return sum(raw.numel() for raw in self.lent) + sum(r.numel() for rs in self.free.values() for r in rs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder stack: the longest ModuleList in the model (model.layers, transformer.h, peft-wrapped too)."""
    lists: list[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    longest = max(lists, key=lambda stack: len(list(stack)), default=None)
    return list(longest) if longest is not None else []


@dataclass(frozen=True)
class SavedView:
    """What the pack hook hands autograd for a moved tensor: its storage's key and how to view it again."""

    key: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def of(self, storage_bytes: torch.Tensor) -> torch.Tensor:
        return storage_bytes.view(self.dtype).as_strided(self.size, self.stride, self.offset)


def is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, autocast's copy of a trainable one (the cast whose gradient goes straight to the parameter),
    or a view of either (the transposed weight a matmul saves). Those stay: they are not activations, and the
    memory plan counts them apart."""
    base = tensor._base if tensor._base is not None else tensor
    if isinstance(base, nn.Parameter):
        return True
    cast = base.grad_fn
    return cast is not None and type(cast).__name__ == "ToCopyBackward0" and all(
        f is None or type(f).__name__ == "AccumulateGrad" for f, _ in cast.next_functions)


class ActivationOffload:
    """Saved-tensor hooks that move a forward's saved activations to host memory and bring them back in backward.
    `with offload.saving():` around the model's forward (not the loss); one micro-batch at a time."""

    def __init__(self, model: nn.Module, device: torch.device, min_bytes: int = MIN_BYTES) -> None:
        self.device, self.min_bytes = device, min_bytes
        self.on_gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.on_gpu else None
        self.buffers = HostBuffers(pinned=self.on_gpu)
        self.moved: dict[int, Moved] = {}
        self.by_layer: dict[int, list[int]] = {}
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}  # device address -> (its storage, key in moved)
        self.layer = -1
        self.moved_bytes = 0  # bytes the last forward moved to host memory
        self.kept_bytes = 0  # activation bytes it left on the device (tensors under min_bytes)
        for index, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(self._entering(index))

    def _entering(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.layer = index
        return hook

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """One forward whose saved tensors move to host memory; the previous micro-batch's are released first."""
        self._release()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _release(self) -> None:
        self.moved, self.by_layer, self.storages = {}, {}, {}
        self.layer, self.moved_bytes, self.kept_bytes = -1, 0, 0
        self.buffers.give_back_all()

    # ---------------------------------------------------------------------------------------------- forward

    def _pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device != self.device or is_weight(tensor):
            return tensor
        if nbytes < self.min_bytes:
            self.kept_bytes += nbytes
            return tensor
        storage = tensor.untyped_storage()
        if storage.nbytes() > 2 * nbytes:  # a small view of a big buffer: move just the view, contiguous
            whole = tensor.contiguous().view(-1)
            view = SavedView(self._move(whole.view(torch.uint8)), tensor.dtype, tuple(tensor.size()),
                             tuple(torch.empty(0).new_empty(tensor.size()).stride()), 0)
        else:  # the whole storage, once for every saved tensor that views it
            view = SavedView(self._storage_key(storage), tensor.dtype, tuple(tensor.size()), tuple(tensor.stride()),
                             int(tensor.storage_offset()))
        self.moved[view.key].views += 1
        return view

    def _storage_key(self, storage: torch.UntypedStorage) -> int:
        """The key of this storage's host copy, made now unless an earlier saved tensor already moved it (an
        address is only trusted while the storage that had it is alive: freed memory is reused)."""
        known = self.storages.get(storage.data_ptr())
        if known is not None and not known[0].expired():
            return known[1]
        key = self._move(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage))
        self.storages[storage.data_ptr()] = (StorageWeakRef(storage), key)
        return key

    def _move(self, source: torch.Tensor) -> int:
        """Copy these bytes (a flat uint8 tensor on the device) to a host buffer; the key of the copy."""
        host = self.buffers.take(source.numel())
        entry = Moved(self.layer, host, source.device)
        if self.on_gpu:
            self._copy_out(source, entry)
        else:
            host.copy_(source)
        key = len(self.moved)
        self.moved[key] = entry
        self.by_layer.setdefault(entry.layer, []).append(key)
        self.moved_bytes += source.numel()
        return key

    def _copy_out(self, tensor: torch.Tensor, entry: Moved) -> None:
        """Device -> pinned host on the side stream, after the compute that produced the tensor."""
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            entry.host.copy_(tensor, non_blocking=True)
            entry.copied = torch.cuda.Event()
            entry.copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is reused only after the copy, though we drop it now

    # --------------------------------------------------------------------------------------------- backward

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        entry = self.moved[packed.key]
        if not self.on_gpu:
            return packed.of(entry.host)
        if entry.fetched is None:  # not prefetched (or asked for a second time)
            self._fetch(entry)
        self._prefetch(self._layer_before(entry.layer))  # one layer ahead: backward goes down the stack
        assert entry.fetched is not None
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(entry.arrived)
        storage_bytes = entry.fetched
        storage_bytes.record_stream(compute)
        entry.unpacked += 1
        if entry.unpacked >= entry.views:  # the last view: autograd's references keep it as long as needed
            entry.fetched = None
        return packed.of(storage_bytes)

    def _layer_before(self, layer: int) -> int | None:
        earlier = [n for n in self.by_layer if n < layer]
        return max(earlier) if earlier else None

    def _prefetch(self, layer: int | None) -> None:
        """Start bringing a layer's tensors back to the device, those not already on their way or delivered."""
        for key in self.by_layer.get(layer, []) if layer is not None else []:
            entry = self.moved[key]
            if entry.fetched is None and entry.unpacked == 0:
                self._fetch(entry)

    def _fetch(self, entry: Moved) -> None:
        """Pinned host -> device on the side stream, once the copy out has finished."""
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(entry.copied)
            entry.fetched = entry.host.to(entry.device, non_blocking=True)
            entry.arrived = torch.cuda.Event()
            entry.arrived.record(self.stream)
