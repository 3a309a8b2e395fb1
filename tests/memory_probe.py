"""Measure the activation memory of one forward+backward on CPU, to check the plan's prediction.

Method: in a fresh process, build the model (fp32 weights), run one warm-up forward+backward, keep the
gradients allocated (zeroed, not freed), then sample the process's resident set size every millisecond from
a thread during a second forward+backward. Measured = peak RSS during it minus RSS just before it. Predicted
= the plan's activations + logits/loss buffers (+ autocast weight copies): what a forward+backward adds on top
of weights, gradients and optimizer state.
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
    def step():
        with prec.autocast():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        token_loss_sum(out, ids).backward()
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


def measure(recipe: str, configs: list[list[str]]) -> list[int]:
    """Peak RSS delta (bytes) of one forward+backward with gradients already allocated, per config (one
    process measures them one after the other: freed blocks leave the RSS, so each starts from its own base)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, recipe, json.dumps(configs)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                               # large blocks straight from mmap: freed memory leaves the RSS at once
                               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])
