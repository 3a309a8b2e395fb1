"""What one micro-batch's forward and backward hold beyond the model states: the activations saved for backward
(per token and layer, with and without gradient checkpointing, on the GPU or offloaded to host memory), the
block-diagonal masks of packed rows, the logits and the loss, and an INT8 layer dequantized inside its matmul.

The per-layer formula was measured for the Llama family (llama, mistral, qwen2, qwen3, mixtral) with autograd's
saved-tensor hooks on CPU (tests/memory_probe.py): fp32 `32h + 8kv + 16f + 4a + 8` bytes per token, bf16/fp16
autocast `30h + 4kv + 8f + 4a + 8` (h hidden, kv = kv heads x head dim, f intermediate, a heads); with gradient
checkpointing only each layer's input (4h, the residual stream is fp32) plus one layer recomputed in full.

A mixture-of-experts layer (Qwen3-MoE, Mixtral) replaces the MLP's `16f` (bf16: `8f`) by what each of the k
experts a token is routed to keeps: fp32 `k (10h + 16fe)`, bf16 `k (10h + 15fe)` (fe one expert's intermediate size;
the token's gathered input, the gate/up output, the activation and the weighted output, per expert), measured by
the peak RSS of one forward and backward (tests/memory_probe.py) over 12 shapes (k 1-6, 4-32 experts) within 5%.
Attention that normalizes queries and keys (Qwen3's QK-norm) keeps `6 (h + kv)` more (bf16 `4 (h + kv)`).
"""

from __future__ import annotations

from trainer.data.packing import sample_mode
from trainer.model.loss import chunk_rows, head_chunk_rows
from trainer.plan.items import Shapes
from trainer.plan.optimizer_state import int8_targets, lora_targets
from trainer.recipe.architecture import default_attention
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import PAIRED_OBJECTIVES, REFERENCE_OBJECTIVES

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"}


def sequences_per_micro_batch(run: ResolvedRun) -> int:
    """Rows of one forward: micro_batch_size, or twice it for pair objectives (a pair's chosen and rejected
    sequences; micro_batch_size counts pairs)."""
    paired = run.recipe.objective.name in PAIRED_OBJECTIVES
    return run.recipe.train.micro_batch_size * (2 if paired else 1)


def micro_batch_tokens(run: ResolvedRun) -> int:
    """Tokens of one micro-batch that this rank computes: each row's (a pair's two), under sequence
    parallelism seq_len / N of each row."""
    return sequences_per_micro_batch(run) * run.recipe.data.seq_len // run.execution.sequence_parallel


def reference_forward_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """A preference run's reference forward, under no_grad before the policy's (adapters disabled each micro-batch;
    full training: once, before the first step): no activation is saved, so its peak is its logits in the compute
    dtype with one fp32 chunk of the log-prob work, and one layer's activations in flight. 0 without a reference."""
    objective = run.recipe.objective
    if objective.name not in REFERENCE_OBJECTIVES:
        return 0
    tokens = micro_batch_tokens(run)
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    chunk = min(tokens, chunk_rows(sh.vocab)) * sh.vocab
    return compute * tokens * sh.vocab + (4 if compute == 4 else 8) * chunk + tokens * layer_bytes_per_token(run, sh)


def layer_bytes_per_token(run: ResolvedRun, sh: Shapes) -> int:
    """Bytes one decoder layer saves for backward per token (the measured formula of the module docstring)."""
    h, kv, a = sh.hidden, sh.kv_dim, sh.heads
    fp32 = run.recipe.precision.dtype == "fp32"
    per = (32 * h + 8 * kv + 4 * a + 8) if fp32 else (30 * h + 4 * kv + 4 * a + 8)
    if not tiled_mlp(run, sh):  # tiled: the MLP keeps only its input (views of it); one tile is recomputed at a time
        per += _mlp_bytes_per_token(sh, fp32)
    if sh.qk_norm:
        per += (6 if fp32 else 4) * (h + kv)
    if sh.model_type not in LLAMA_LIKE:  # GPT-2 style: LayerNorm and GELU keep a little more; approximate
        per = int(per * 1.15)
    if run.execution.adapted:  # LoRA: the A projection's output (rank r) per adapted matrix
        per += 4 * run.recipe.adapter.rank * len(lora_targets(run, sh)) // max(sh.layers, 1)
    return per


def _mlp_bytes_per_token(sh: Shapes, fp32: bool) -> int:
    """What a layer's MLP saves per token, averaged over the layers: dense `16f` (bf16 `8f`), or in a mixture-of-
    experts layer the k experts' `k (10h + 16fe)` (bf16 `15fe`)."""
    dense = (16 if fp32 else 8) * sh.intermediate
    e = sh.experts
    if e is None:
        return dense
    routed = e.active * (10 * sh.hidden + (16 if fp32 else 15) * e.intermediate)
    return (e.layers * routed + (sh.layers - e.layers) * dense) // sh.layers


def tiled_mlp(run: ResolvedRun, sh: Shapes) -> bool:
    """model.tiled_mlp applies: more than one tile, dense MLPs (mixture-of-experts blocks are left untiled)."""
    return run.mlp_tiles > 1 and sh.experts is None


def mlp_tile_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """Tiled MLP: the one tile recomputed in backward, its intermediates (the untiled MLP's per-token bytes for
    1/tiles of the tokens) and the gradients of three of them (gate, up, their product: 3f per token in the
    compute dtype), 7/4 of the intermediates in fp32 and in bf16 (16f + 12f, 8f + 6f); the forward's tile holds
    less."""
    if not tiled_mlp(run, sh):
        return 0
    tokens = -(-micro_batch_tokens(run) // run.mlp_tiles)
    return tokens * _mlp_bytes_per_token(sh, run.recipe.precision.dtype == "fp32") * 7 // 4


def exchange_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """Sequence parallelism: one attention layer's all-to-all buffers, alive while it runs (forward, and again in
    backward): queries, keys and values sent and received, then the output sent and received, in the compute
    dtype (model/sequence_parallel.py)."""
    if run.execution.sequence_parallel == 1:
        return 0
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    return 2 * micro_batch_tokens(run) * (2 * sh.hidden + 2 * sh.kv_dim) * compute


def activation_bytes(run: ResolvedRun, sh: Shapes, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (forward to the start of backward)."""
    per_layer = layer_bytes_per_token(run, sh)
    # the final norm (its fp32 input and scale) and the LM head's input (fp32, or the bf16/fp16 cast)
    outside = (12 if run.recipe.precision.dtype == "fp32" else 10) * sh.hidden + 12
    if checkpointing:  # each layer's input is kept (fp32 residual stream); one layer is recomputed at a time
        return micro_batch_tokens(run) * (sh.layers * 4 * sh.hidden + per_layer + outside)
    return micro_batch_tokens(run) * (sh.layers * per_layer + outside)


def offloaded_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What model.activation_offload moves to host memory per micro-batch (trainer/model/activation_offload.py): every
    saved activation, or with checkpointing each layer's input and what the final norm and the LM head keep (the
    recomputed layer stays on the GPU)."""
    if not run.recipe.model.activation_offload:
        return 0
    if run.recipe.model.gradient_checkpointing:
        return activation_bytes(run, sh, True) - micro_batch_tokens(run) * layer_bytes_per_token(run, sh)
    return activation_bytes(run, sh, False)


def offload_window_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What offloading leaves on the GPU at a time: the layer whose saved tensors backward is using and the one
    prefetched ahead of it (in the forward, at most as much is in flight to the host)."""
    per_layer = 4 * sh.hidden if run.recipe.model.gradient_checkpointing else layer_bytes_per_token(run, sh)
    return 2 * micro_batch_tokens(run) * per_layer


def forward_backward_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What one micro-batch's forward and backward add at their peak on top of the model states (autocast copies
    apart). Without checkpointing, every saved activation and the logits coexist at the end of the forward. With
    it, the end of the forward holds each layer's input and the logits; the one recomputed layer exists only in
    backward, after the logits' gradient has been consumed by the head: the larger of the two counts. Offloaded
    activations are replaced by the two layers' worth in flight."""
    checkpointing = run.recipe.model.gradient_checkpointing
    saved, logits = activation_bytes(run, sh, checkpointing), logits_bytes(run, sh)
    if run.recipe.model.activation_offload:
        saved += offload_window_bytes(run, sh) - offloaded_bytes(run, sh)
    saved += packed_mask_bytes(run)
    # a layer's transients (not alive with the logits): its MLP tile, or its attention's all-to-all buffers
    inside_layer = max(mlp_tile_bytes(run, sh), exchange_bytes(run, sh))
    if not checkpointing:
        return saved + max(logits, inside_layer)
    recomputed = micro_batch_tokens(run) * layer_bytes_per_token(run, sh)
    return saved - recomputed + max(recomputed + inside_layer, logits)


def _formats(run: ResolvedRun) -> set[str]:
    d = run.recipe.data
    return {e.format or d.format for e in d.sources} if d.sources else {d.format}


def packed_mask_bytes(run: ResolvedRun) -> int:
    """Packed rows whose attention stays inside each example (isolated packing, document_mask): sdpa and eager get
    a block-diagonal mask of seq_len x seq_len per row (bool for sdpa, the compute dtype for eager);
    FlashAttention-2 takes the sequence boundaries instead and needs none."""
    d, attention = run.recipe.data, attention_of(run)
    confined = any(sample_mode(f, d.packing, d.document_mask) in (("isolated", False), ("concat", True))
                   for f in _formats(run))
    if not confined or attention.startswith("flash"):
        return 0
    per_entry = 1 if attention == "sdpa" else (4 if run.recipe.precision.dtype == "fp32" else 2)
    return run.recipe.train.micro_batch_size * d.seq_len * d.seq_len * per_entry


def attention_of(run: ResolvedRun) -> str:
    """The attention implementation the model runs: the recipe's, else the architecture's default (Gemma 2: eager)."""
    return run.recipe.model.attn_implementation or default_attention(run.architecture)


def packing_label(run: ResolvedRun) -> str:
    """How the plan's micro-batch of seq_len tokens is filled."""
    d = run.recipe.data
    modes = {sample_mode(f, d.packing, d.document_mask)[0] for f in _formats(run)}
    if modes <= {"none", "pairs", "single"}:
        return "padded rows: at most"
    return "packed: no padding" if "isolated" in modes else "packed"


def logits_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """The logits and their gradient in the compute dtype, plus one chunk of the loss's fp32 work (the softmax,
    and an fp32 copy when the logits are bf16/fp16): trainer/model/loss.py never copies the whole logits to fp32.
    With model.head_in_loss no logits of the whole sequence exist: see head_in_loss_bytes."""
    tokens = micro_batch_tokens(run)
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    chunk = min(tokens, chunk_rows(sh.vocab)) * sh.vocab
    if run.recipe.model.head_in_loss:
        return head_in_loss_bytes(run, sh, tokens, compute, min(tokens, head_chunk_rows(sh.vocab)) * sh.vocab)
    return 2 * compute * tokens * sh.vocab + (4 if compute == 4 else 8) * chunk


def head_in_loss_bytes(run: ResolvedRun, sh: Shapes, tokens: int, compute: int, chunk: int) -> int:
    """model.head_in_loss (trainer/model/loss.py): the gradient of the hidden states (fp32, tokens x hidden),
    one chunk's logits and their gradient in the compute dtype with its fp32 work, the head's weight cast to the
    compute dtype (bf16/fp16), and when the head trains its fp32 gradient (vocab x hidden) and that gradient in the
    weight's dtype."""
    head = sh.vocab * sh.hidden
    out = 4 * tokens * sh.hidden + (2 * compute + 8) * chunk
    if compute != 4:
        out += compute * head
    if not run.execution.adapted:
        out += 4 * head + (4 if run.recipe.precision.master_weights else compute) * head
    return out


def dequantized_in_flight(run: ResolvedRun, sh: Shapes) -> int:
    """INT8 weights are dequantized inside each matmul of the forward and backward: one copy of a layer in the
    compute dtype at a time (the largest target), never saved for backward."""
    int8 = int8_targets(run, sh)
    if not int8:
        return 0
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    return compute * max(p.numel for p in sh.params if p.name in int8)
