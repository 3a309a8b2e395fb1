"""`python -m trainer data RECIPE --show N`: what the model will be trained on, before training. It builds the
tokenizer and the data as a training run would, then prints N samples as text with the tokens that carry the loss
marked, and the counts: documents, dropped rows (those longer than data.seq_len among them) or truncated ones,
tokens, loss tokens, samples, and how full the samples are."""

from __future__ import annotations

from typing import Any, TextIO

from trainer.data.batches import Batch, DataPosition, TrainData
from trainer.model.loss import IGNORE
from trainer.recipe.resolved import ResolvedRun
from trainer.model.tokenizer import build_tokenizer, settle_chat_template

OPEN, CLOSE = "\x1b[42m\x1b[30m", "\x1b[0m"  # loss tokens on a green background, in a terminal
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"  # elsewhere


def _rows(batch: Batch) -> list[tuple[int, str]]:
    """The rows of a batch in the order shown, with what each is: a pair's chosen sequence then its rejected one
    (a preference batch holds every chosen row first), a KTO completion with its label."""
    rows = batch.preference
    if rows is None:
        return [(i, "") for i in range(len(batch.input_ids))]
    if rows.pairs:
        n = rows.examples
        return [(i + k * n, f", pair {i + 1} {'rejected' if k else 'chosen'}") for i in range(n) for k in (0, 1)]
    assert rows.desirable is not None
    return [(i, f", {'desirable' if bool(rows.desirable[i]) else 'undesirable'}") for i in range(len(rows.documents))]


def _marked(tokenizer: object, ids: list[int], labels: list[int], colour: bool) -> str:
    """The sample's text, with every run of loss-carrying tokens wrapped in markers."""
    start, end = (OPEN, CLOSE) if colour else (PLAIN_OPEN, PLAIN_CLOSE)
    pieces, run, learned = [], [], None
    for token, label in zip(ids, labels):
        is_learned = label != IGNORE
        if learned is not None and is_learned != learned:
            text = tokenizer.decode(run)  # type: ignore[attr-defined]
            pieces.append(f"{start}{text}{end}" if learned else text)
            run = []
        run.append(token)
        learned = is_learned
    if run:
        text = tokenizer.decode(run)  # type: ignore[attr-defined]
        pieces.append(f"{start}{text}{end}" if learned else text)
    return "".join(pieces)


def _too_long(summary: dict[str, Any], choice: str, seq_len: int) -> str:
    """What data.too_long did, after the dropped count: '' when no example was longer than seq_len."""
    if not summary["too_long"]:
        return ""
    if choice == "truncate":
        return (f", {summary['too_long']} truncated to data.seq_len={seq_len} ({summary['tokens_cut']:,} tokens cut; "
                "data.too_long: truncate)")
    return f" ({summary['too_long']} of them longer than data.seq_len={seq_len}; data.too_long: drop)"


def show(run: ResolvedRun, count: int, out: TextIO, colour: bool) -> None:
    r = run.recipe
    tokenizer = build_tokenizer(r.model)
    template = settle_chat_template(tokenizer, r.data)
    data = TrainData(r.data, tokenizer, seed=r.train.seed, rank=0, world_size=1,
                     micro_batch_size=r.train.micro_batch_size, grad_accum_steps=1)
    marker = "highlighted" if colour else f"between {PLAIN_OPEN} and {PLAIN_CLOSE}"
    out.write(f"data of {run.recipe_path or 'the recipe'}: {r.data.source} ({r.data.format}"
              f"{', chat template: ' + template if template else ''}); tokens that carry the loss are {marker}\n")
    position, shown = DataPosition(), 0
    while shown < count and shown < data.num_train_samples:
        (batch,), position = data.step_batches(position)
        for row, what in _rows(batch):
            if shown == count:
                break
            ids, mask, labels = batch.input_ids[row], batch.attention_mask[row], batch.labels[row]
            real = int(mask.sum())
            # the loss of token t is predicted at t-1: mark the tokens whose own label is learned
            out.write(f"\n--- sample {shown + 1}{what} ({real} tokens, {int((labels[1:real] != IGNORE).sum())} carry "
                      f"the loss) ---\n{_marked(tokenizer, ids[:real].tolist(), labels[:real].tolist(), colour)}\n")
            shown += 1
    s = data.summary
    out.write(f"\n{s['documents']} rows, {s['dropped']} dropped{_too_long(s, r.data.too_long, r.data.seq_len)}; "
              f"{s['tokens']:,} tokens; {data.num_train_samples} "
              f"training samples of <= {r.data.seq_len} tokens, {data.train_fill:.1%} of their positions hold tokens "
              f"(the rest is padding); {data.num_eval_samples} eval samples; one epoch = "
              f"{data.num_train_samples // run.global_batch_size} steps of {run.global_batch_size} samples\n")
