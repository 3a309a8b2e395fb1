"""Measure the activation memory of one forward+backward on CPU, to check the plan's prediction.

Method: in a fresh process, build the model (fp32 weights), run one warm-up forward+backward, keep the
gradients allocated (zeroed, not freed), then sample the process's resident set size every millisecond from
a thread during a second forward+backward. Measured = peak RSS during it minus RSS just before it. Predicted
= the plan's forward_backward_bytes (activations, logits and loss) + autocast weight copies: what a
forward+backward adds on top of weights, gradients and optimizer state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r'''
import json, sys, threading, time, os
import psutil, torch
from trainer.config import load_recipe
from trainer.tokenizer import build_tokenizer
from trainer.model import build_model
from trainer.loop import token_loss_sum
from trainer.precision import Precision
torch.set_num_threads(1)
proc = psutil.Process()
results = []
for overrides in json.loads(sys.argv[2]):
    cfg = load_recipe(sys.argv[1], overrides)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, 0).train()
    prec = Precision(cfg.precision, torch.device("cpu"))
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, len(tok), (b, s), generator=torch.Generator().manual_seed(0))
    def step():  # as the loop: the logits are not kept beyond the loss
        with prec.autocast():
            logits = [model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits]
        token_loss_sum(logits.pop(), ids).backward()
    step()
    for p in model.parameters():
        p.grad.zero_()
    import gc; gc.collect()
    base = proc.memory_info().rss
    peak, stop = [base], [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)
    t = threading.Thread(target=sample); t.start()
    step()
    stop[0] = True; t.join()
    results.append(peak[0] - base)
    del model, step
    gc.collect()
print(json.dumps(results))
'''


TIED_PROBE = r'''
import gc, json, sys
import psutil, torch
from trainer.config import load_recipe
from trainer.model import build_model
from trainer.tokenizer import build_tokenizer
torch.set_num_threads(1)
proc = psutil.Process()
out = {}
for tied in ("true", "false"):
    cfg = load_recipe(sys.argv[1], [*json.loads(sys.argv[2]), f"model.config.tie_word_embeddings={tied}"])
    model = build_model(cfg.model, build_tokenizer(cfg.model), 0).train()
    middle = {p for n, p in model.named_parameters() if ".layers.1." in n}
    samples = []
    def free(p):  # what per-layer updates do: the gradient is gone once its hook has run
        if p in middle:
            samples.append(proc.memory_info().rss)
        p.grad = None
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(free)
    ids = torch.randint(0, cfg.model.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the first pass warms the allocator up
        samples.clear()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        del logits
        gc.collect()
        base = proc.memory_info().rss
        loss.backward()
    out[tied] = max(samples) - base
    del model
    gc.collect()
print(json.dumps(out))
'''


LOSS_PROBE = r'''
import gc, json, sys, threading, time
import psutil, torch
import torch.nn.functional as F
from trainer.loss import token_loss_sum
torch.set_num_threads(1)
proc = psutil.Process()
batch, seq, vocab = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[4]]
def plain(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), reduction="sum")
out = []
for fn in (token_loss_sum, plain):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, 32, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(32, vocab, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    for _ in range(2):  # the first pass warms the allocator up
        h.grad = w.grad = None
        gc.collect()
        base = proc.memory_info().rss
        peak, stop = [base], [False]
        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.0003)
        thread = threading.Thread(target=sample)
        thread.start()
        fn(h @ w, labels).backward()  # the logits live only inside the expression, as in the loop
        stop[0] = True
        thread.join()
    grads = h.numel() * h.element_size() + w.numel() * w.element_size()
    out.append((peak[0] - base - grads) / (batch * seq * vocab))
    del h, w
print(json.dumps(out))
'''


def loss_bytes_per_logit(batch: int, seq: int, vocab: int, dtype: str) -> tuple[float, float]:
    """Peak RSS per logit of a (batch, seq, 32) x (32, vocab) matmul, the loss and its backward, beyond the
    inputs and their gradients: (trainer.loss.token_loss_sum, plain F.cross_entropy on fp32 logits)."""
    ours, plain = _run(LOSS_PROBE, str(batch), str(seq), str(vocab), dtype)  # type: ignore[misc]
    return ours, plain


def _run(code: str, *args: str) -> object:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                               # large blocks straight from mmap: freed memory leaves the RSS at once
                               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tied_gradient_held(recipe: str, overrides: list[str]) -> int:
    """Bytes a tied embedding adds in the middle of backward when every gradient is freed by its hook (as
    per-layer updates do): RSS above the start of backward while the second layer's gradients arrive, tied
    minus untied. Autograd keeps the head's share of a tied weight's gradient until the embedding's own share
    arrives at the end of backward; untied, the head's gradient is freed by its hook at once."""
    held = _run(TIED_PROBE, recipe, json.dumps(overrides))
    return held["true"] - held["false"]  # type: ignore[index]


def measure(recipe: str, configs: list[list[str]]) -> list[int]:
    """Peak RSS delta (bytes) of one forward+backward with gradients already allocated, per config (one
    process measures them one after the other: freed blocks leave the RSS, so each starts from its own base)."""
    return _run(PROBE, recipe, json.dumps(configs))  # type: ignore[return-value]
