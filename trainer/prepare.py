"""`python -m trainer prepare RECIPE`: build the recipe's token stores ahead of time (on a CPU node, say), so the
training job starts in seconds; it prints, per source, the store's path, documents, tokens, dropped rows, bytes on
disk and the time it took. A store that is already there and current is only opened."""

from __future__ import annotations

import time
from typing import TextIO

from trainer.data.batches import open_stores
from trainer.distributed import restart_count
from trainer.faults import Faults
from trainer.data.store import describe_dropped
from trainer.resolved import ResolvedRun
from trainer.tokenizer import build_tokenizer, settle_chat_template


def prepare(run: ResolvedRun, out: TextIO, progress: bool) -> None:
    r = run.recipe
    tokenizer = build_tokenizer(r.model)
    settle_chat_template(tokenizer, r.data)
    started = time.perf_counter()
    faults = Faults.from_environment(0, restart_count())
    for opened in open_stores(r.data, tokenizer, progress=progress, on_chunk=faults.during_prepare):
        m, store = opened.store.manifest, opened.store
        tokens = sum(m["tokens"].values())
        how = f"built in {m['seconds']:.1f} s with {m['workers']} process(es)" if opened.built else "already built"
        out.write(f"{opened.spec.source} ({opened.spec.format}): {how}\n"
                  f"  store: {store.path}\n"
                  f"  {m['documents']:,} documents ({m['train_documents']:,} train), {tokens:,} tokens "
                  f"({m['tokens']['train']:,} train), {m['dropped']:,} rows dropped"
                  f"{': ' + describe_dropped(m) if m['dropped'] else ''}\n"
                  f"  {store.bytes_on_disk / 2**20:,.1f} MiB on disk ({store.bytes_on_disk / max(1, tokens):.2f} "
                  f"bytes per token)\n")
    out.write(f"done in {time.perf_counter() - started:.1f} s\n")
