"""Data at scale: the token store against `datasets.map(batched=True, num_proc=N)`, on real text corpora of growing
size, with the byte tokenizer and a GPT-2-style BPE trained here.

    python benchmarks/data_scale.py                          # 50, 200 and 800 MB corpora (takes a while)
    python benchmarks/data_scale.py --sizes 20 --num-proc 2  # a quick look

The corpora are the Python source files of this environment (site-packages and the standard library), one JSON line
per file, repeated in order until the size is reached. Every measurement runs in a fresh process, so its peak RSS is
its own (worker processes are measured as children: the largest one). Columns:
- prepare: building the token store (`python -m trainer prepare` does this): seconds, tokens/s, peak RSS of the
  builder and of its largest worker, bytes on disk per token;
- datasets.map: `load_dataset("json")` then `.map(tokenize, batched=True, num_proc=N)`, the way other trainers
  preprocess, with the same tokenizer: seconds, tokens/s, peak RSS;
- start-up: opening the built store as a training run does (TrainData: manifest, memory maps, the epoch order) and
  cutting the first step's batch: seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_sources() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])}
    return sorted(p for root in roots for p in root.rglob("*.py") if p.is_file())


def make_corpus(path: Path, megabytes: int) -> Path:
    """JSON lines of Python source files, repeated until `megabytes` (a real, varied text corpus, no download)."""
    if path.exists():
        return path
    target, written = megabytes * 2**20, 0
    files = python_sources()
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for f in files:
                text = f.read_text(encoding="utf-8", errors="replace")
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line)
                if written >= target:
                    break
    return path


def make_bpe(folder: Path, sample: Path) -> Path:
    """A byte-level BPE with a 32k vocabulary trained on the corpus (as GPT-2's), saved for the measuring processes."""
    target = folder / "bpe"
    if (target / "tokenizer.json").exists():
        return target
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = (json.loads(line)["text"] for line in open(sample, encoding="utf-8"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((t for _, t in zip(range(4000), texts)), vocab_size=32000, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(target)
    return target


def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest child) peak RSS in MiB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def tokenizer_of(name: str) -> object:
    from transformers import AutoTokenizer

    from trainer.model.tokenizer import byte_tokenizer

    return byte_tokenizer() if name == "byte" else AutoTokenizer.from_pretrained(name)


def measure_prepare(corpus: str, tokenizer: str, cache: str, num_proc: int) -> dict[str, float]:
    from trainer.data.batches import open_stores
    from trainer.recipe.schema import DataConfig

    started = time.perf_counter()
    (opened,) = open_stores(DataConfig(source=corpus, cache_dir=cache, seq_len=2048), tokenizer_of(tokenizer),
                            num_proc=num_proc)
    seconds = time.perf_counter() - started
    tokens = sum(opened.store.manifest["tokens"].values())
    rss, child = peak_rss_mib()
    return {"seconds": seconds, "tokens": tokens, "rss": rss, "child_rss": child,
            "bytes_per_token": opened.store.bytes_on_disk / tokens}


def measure_startup(corpus: str, tokenizer: str, cache: str) -> dict[str, float]:
    from trainer.data.batches import DataPosition, TrainData
    from trainer.recipe.schema import DataConfig

    tok = tokenizer_of(tokenizer)
    started = time.perf_counter()
    data = TrainData(DataConfig(source=corpus, cache_dir=cache, seq_len=2048), tok, seed=0, rank=0, world_size=1,
                     micro_batch_size=8, grad_accum_steps=1)
    data.step_batches(DataPosition())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss": peak_rss_mib()[0], "samples": data.num_train_samples}


def measure_datasets(corpus: str, tokenizer: str, cache: str, num_proc: int) -> dict[str, float]:
    import datasets

    datasets.disable_progress_bars()
    tok = tokenizer_of(tokenizer)
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    ids = ds.map(lambda batch: {"input_ids": tok(batch["text"])["input_ids"]}, batched=True, num_proc=num_proc,
                 remove_columns=ds.column_names)
    tokens = sum(len(x) for x in ids.with_format("numpy")["input_ids"])
    seconds = time.perf_counter() - started
    rss, child = peak_rss_mib()
    return {"seconds": seconds, "tokens": tokens, "rss": rss, "child_rss": child}


MEASURES = {"prepare": measure_prepare, "startup": measure_startup, "datasets": measure_datasets}


def in_fresh_process(kind: str, *args: object) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", kind, json.dumps(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,200,800", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trainer-data-scale")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.measure:
        print(json.dumps(MEASURES[a.measure](*json.loads(a.args))))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    corpora = {mb: make_corpus(a.work / f"corpus-{mb}mb.jsonl", mb) for mb in sizes}
    bpe = make_bpe(a.work, corpora[min(sizes)])
    print("| corpus | tokenizer | tokens | prepare s | prepare tok/s | prepare RSS MiB (largest worker) | "
          "datasets.map s | datasets.map tok/s | datasets.map RSS MiB (largest worker) | start-up s | "
          "start-up RSS MiB | store bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mb, corpus in corpora.items():
        for name, tok in (("byte", "byte"), ("BPE 32k", str(bpe))):
            cache = a.work / f"stores-{mb}-{name.replace(' ', '')}"
            hf_cache = a.work / f"hf-{mb}-{name.replace(' ', '')}"
            subprocess.run(["rm", "-rf", str(cache), str(hf_cache)], check=True)
            p = in_fresh_process("prepare", str(corpus), tok, str(cache), a.num_proc)
            s = in_fresh_process("startup", str(corpus), tok, str(cache))
            d = in_fresh_process("datasets", str(corpus), tok, str(hf_cache), a.num_proc)
            subprocess.run(["rm", "-rf", str(hf_cache)], check=True)
            print(f"| {mb} MB | {name} | {p['tokens']:,.0f} | {p['seconds']:.1f} | {p['tokens'] / p['seconds']:,.0f} | "
                  f"{p['rss']:,.0f} ({p['child_rss']:,.0f}) | {d['seconds']:.1f} | {d['tokens'] / d['seconds']:,.0f} | "
                  f"{d['rss']:,.0f} ({d['child_rss']:,.0f}) | {s['seconds']:.2f} | {s['rss']:,.0f} | "
                  f"{p['bytes_per_token']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
