"""`python -m trainer prepare RECIPE`: build the recipe's token stores ahead of time (on a CPU node, say), so the
training job starts in seconds; it prints, per source, the store's path, documents, tokens, dropped rows (those
longer than data.seq_len among them) or truncated ones, bytes on disk and the time it took. A store that is
already there is verified in full (every file's SHA-256) and rebuilt when damaged. A store built here holds the
isolated packing plan of the recipe's seed; for a store built for another seed, the plan is computed here and kept
in the recipe's output_dir, where the run finds it (a built store is never written again)."""

from __future__ import annotations

import time
from typing import Any, TextIO

from trainer.data.batches import open_stores, sample_sets
from trainer.data.plans import RUN_PLAN_DIR
from trainer.data.store import describe_dropped, describe_too_long
from trainer.distributed import restart_count
from trainer.faults import Faults
from trainer.recipe.resolved import ResolvedRun
from trainer.model.tokenizer import build_tokenizer, settle_chat_template


def too_long_report(manifest: dict[str, Any], seq_len: int) -> str:
    """What data.too_long did, for the report: '' when no example was longer than seq_len."""
    long = manifest["too_long"]
    if not long["rows"]:
        return ""
    if long["choice"] == "truncate":
        return (f"  {long['rows']:,} examples longer than data.seq_len={seq_len} truncated to it "
                f"({long['tokens_cut']:,} tokens cut): {describe_too_long(manifest)}\n")
    return f"  {long['rows']:,} of the dropped rows are longer than data.seq_len={seq_len} (data.too_long: drop)\n"


def prepare(run: ResolvedRun, out: TextIO, progress: bool) -> None:
    r = run.recipe
    tokenizer = build_tokenizer(r.model)
    settle_chat_template(tokenizer, r.data)
    started = time.perf_counter()
    faults = Faults.from_environment(0, restart_count())
    opened = open_stores(r.data, tokenizer, seed=r.train.seed, progress=progress, on_chunk=faults.during_prepare,
                         verify=True)
    for split in ("train", "eval"):  # the packing plans the stores do not hold, kept where the run looks
        sample_sets(opened, r.data, r.train.seed, split, run.output_dir / RUN_PLAN_DIR)
    for o in opened:
        m, store = o.store.manifest, o.store
        tokens = sum(m["tokens"].values())
        how = f"built in {m['seconds']:.1f} s with {m['workers']} process(es)" if o.built else \
            "already built (every file verified)"
        out.write(f"{o.spec.source} ({o.spec.format}): {how}\n"
                  f"  store: {store.path}\n"
                  f"  {m['documents']:,} documents ({m['train_documents']:,} train), {tokens:,} tokens "
                  f"({m['tokens']['train']:,} train), {m['dropped']:,} rows dropped"
                  f"{': ' + describe_dropped(m) if m['dropped'] else ''}\n"
                  f"{too_long_report(m, r.data.seq_len)}"
                  f"  {store.bytes_on_disk / 2**20:,.1f} MiB on disk ({store.bytes_on_disk / max(1, tokens):.2f} "
                  f"bytes per token)\n")
    out.write(f"done in {time.perf_counter() - started:.1f} s\n")
