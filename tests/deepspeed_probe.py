"""Test helper, launched under torchrun: train several recipes one after another in one process group and
write what each rank saw, so one launch (6-9 s of torchrun and DeepSpeed start-up) serves many comparisons (the
DeepSpeed tests, and any multi-rank test that trains several runs: the elastic tests resume on 1, 2 and 4 ranks
in one launch per world size).
Native-engine runs can share a launch with DeepSpeed ones (go first); `count_native_bytes` also serves
single-process tests.

    torchrun --standalone --nproc_per_node=N tests/deepspeed_probe.py SPEC.json OUT_DIR

SPEC.json: {"recipe": PATH, "runs": [{"name", "overrides", "fault" (TRAINER_FAULT for this run, optional),
"inspect" (count the model-state tensors after training), "logits" (input ids to run through the trained model),
"load_whole" (adapter runs under ZeRO-3: load the base whole on every rank, defeating the partitioned loading, to
see the sharding check stop the run)}]}.
Each rank writes OUT_DIR/rank<R>.json: {name: {"engine", "bytes", "offload", "logits", "base_held", "error",
"log" (the trainer's log lines of that run, INFO and above)}};
losses are in each run's metrics.jsonl. A run is set up and trained by the real loop (trainer.run.loop.setup /
run_loop); `error` is the message of a TrainerError that stopped it.

Tests launch it with `launch(base, runs, recipe)` (2 ranks; `nproc=N` for another number), which returns
{"facts": {rank: {run: facts}}, "log": stderr}.

Test-only: DeepSpeed's CPU accelerator is made to claim fp16 support, because DeepSpeed refuses fp16 on CPUs
without AVX512-FP16 and its loss scaling could otherwise not be exercised here. The product never does this.
ZeRO-3 runs go last in a spec: zero.Init replaces torch.nn.functional.linear for the rest of the process.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from tests import forked_cli
from trainer.adapters.footprint import held_frozen_bytes, measured
from trainer.errors import TrainerError
from trainer.logs import setup_console
from trainer.model.build import WHOLE
from trainer.distributed import distributed_context
from trainer.engine.deepspeed import import_deepspeed
from trainer.faults import ENV as FAULT_ENV
from trainer.run.loop import Training, run_loop, setup, token_loss_sum
from trainer.recipe.resolve import resolve


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def backward_of_next_step(run: Training) -> None:
    """The forward and backward passes of the next optimizer step, without the step (the caller counts, then
    steps): what a rank holds in the middle of a step."""
    engine = run.engine
    batches, _ = run.data.step_batches(run.state.position)
    dev = run.dist.device
    for i, b in enumerate(batches):
        with engine.accumulate(is_last=i == len(batches) - 1):
            out = engine.forward(**b.model_inputs(dev))  # under sequence parallelism, this rank's columns
            engine.backward(token_loss_sum(out.logits, b.labels.to(dev), out.columns) / max(b.num_loss_tokens(), 1))


def count_bytes(run: Training) -> dict[str, int]:
    """Bytes of the model states this rank holds, counted from DeepSpeed's own tensors in the middle of an
    optimizer step (after backward, before step): parameters, gradients, fp32 master partitions and Adam
    moments. The extra step it runs comes after the logged trajectory and the final checkpoint."""
    engine = run.engine
    ds = engine.ds  # type: ignore[attr-defined]
    backward_of_next_step(run)
    zero = ds.optimizer
    params = [p for p in engine.module.parameters() if p.requires_grad]  # an adapter run's frozen base: "frozen"
    out = {
        # ZeRO-3 keeps a partition in ds_tensor and an empty placeholder in .data; stages 1-2 the whole tensor.
        "params": sum(nbytes(getattr(p, "ds_tensor", None)) + nbytes(p.data) for p in params),
        "frozen": held_frozen_bytes(engine.module),
        # ZeRO-1 keeps whole gradients on the parameters until the step; ZeRO-2 reduces each micro-batch's into
        # its partition (all_grad_tensors, per group), ZeRO-3 into one flat buffer.
        "grads": sum(nbytes(p.grad) for p in params)
        + sum(nbytes(t) for ts in (getattr(zero, "all_grad_tensors", None) or {}).values() for t in ts or [])
        + nbytes(getattr(zero, "grad_partitions_flat_buffer", None)),
        # fp32 master partitions: ZeRO-1/2 and ZeRO-3 keep them under different names.
        "master": sum(nbytes(t) for t in getattr(zero, "single_partition_of_fp32_groups", None)
                      or zero.fp32_partitioned_groups_flat),
        "moments": sum(nbytes(v) for s in ds.basic_optimizer.state.values() for v in s.values()
                       if torch.is_tensor(v) and v.numel() > 1),
        "numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        # ZeRO-2 holds the whole gradient of a parameter that straddles its partition's boundary (one per group).
        "straddle_numel": sum(max(getattr(p, "ds_numel", p.numel()) for p in g)
                              for g in getattr(zero, "bit16_groups", None) or zero.fp16_groups),
    }
    engine.step()
    return out


def count_native_bytes(run: Training) -> dict[str, int]:
    """The same count on the native engine (DDP, sharded optimizer state, per-layer updates, adapters): weights
    (4-bit ones with their quantization state) and this rank's optimizer state by the adapter package's
    `measured`, gradients in the middle of a step. With per-layer updates gradients never exist all at once:
    the count is the most bytes alive when a gradient hook fires (every .grad, the rank-r accumulation buffers
    and the gradients waiting for or in an all-reduce), taken by wrapping the hooks for this one step."""
    engine = run.engine
    module, per_layer = engine.module, getattr(engine, "per_layer", None)
    params = list(dict.fromkeys(module.parameters()))

    def live() -> int:
        n = sum(nbytes(p.grad) for p in params)
        if per_layer is not None:
            n += sum(nbytes(t) for t in per_layer.low_rank.values())
            n += sum(nbytes(x) for _, x, _ in per_layer.ready.values())
            n += sum(nbytes(x) for _, x, _, _ in per_layer.pending)
        return n

    peak = [0]
    if per_layer is not None:
        def counting(p: torch.Tensor) -> None:
            peak[0] = max(peak[0], live())
            per_layer._on_grad(p)

        for handle in per_layer.handles:
            handle.remove()
        per_layer.handles = [p.register_post_accumulate_grad_hook(counting) for p in params if p.requires_grad]
    backward_of_next_step(run)
    opt = engine.optimizer
    out = measured(module, getattr(opt, "optim", opt))  # a sharded optimizer: this rank's own optimizer
    out["grads"] = peak[0] if per_layer is not None else live()
    engine.step()
    return out


def offload_facts(run: Training) -> dict[str, Any]:
    """Where DeepSpeed keeps the optimizer state, and which optimizer updates it."""
    ds = run.engine.ds  # type: ignore[attr-defined]
    tensors = [v for s in ds.basic_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors += list(getattr(ds.optimizer, "single_partition_of_fp32_groups", None)
                    or ds.optimizer.fp32_partitioned_groups_flat)
    return {"optimizer": type(ds.basic_optimizer).__name__,
            "devices": sorted({t.device.type for t in tensors}),
            "dtypes": sorted({str(t.dtype) for t in tensors if t.numel() > 1}),
            "offload_optimizer": bool(ds.zero_offload_optimizer()),
            "offload_params": bool(ds.zero_offload_param())}


@torch.no_grad()
def logits_of(run: Training, ids: list[list[int]]) -> list[list[list[float]]]:
    run.engine.train(False)
    x = torch.tensor(ids, device=run.dist.device)
    out = run.engine.forward(x, torch.ones_like(x)).logits.float().cpu()
    run.engine.train(True)
    return out.tolist()


def initial_weights(run: Training) -> dict[str, str]:
    """{parameter: SHA-256 of its whole value rounded to bf16} before any step (rank 0; every rank calls it):
    what every engine and stage must agree on for a from-scratch recipe."""
    from trainer.engine.deepspeed import full_fp32_state_dict

    engine = run.engine
    weights = full_fp32_state_dict(engine.module) if type(engine).__name__ == "ZeroEngine" else \
        {n: p.detach() for n, p in engine.module.named_parameters()}
    return {name: hashlib.sha256(t.float().cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest()
            for name, t in weights.items()}


@contextlib.contextmanager
def base_loaded_whole() -> Iterator[None]:
    """Test-only defeat of ZeRO-3's partitioned loading: model_init_context yields no partition step, so
    build_model loads the adapter run's base whole on every rank (from_pretrained), as an unsharded loader would."""
    import trainer.engine.deepspeed as zero

    original = zero._partitioned_after_loading
    zero._partitioned_after_loading = lambda run: contextlib.nullcontext(WHOLE)  # type: ignore[assignment]
    try:
        yield
    finally:
        zero._partitioned_after_loading = original  # type: ignore[assignment]


class RunLog(logging.Handler):
    """The trainer's log lines of one run (INFO and above), kept with that run's facts."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_log() -> Iterator[RunLog]:
    handler = RunLog()
    logger = logging.getLogger("trainer")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def one_run(spec: dict[str, Any], recipe: str, dist: Any) -> dict[str, Any]:
    with captured_log() as log:
        result = train_one(spec, recipe, dist)
    return {**result, "log": "\n".join(log.lines)}


def train_one(spec: dict[str, Any], recipe: str, dist: Any) -> dict[str, Any]:
    os.environ.pop(FAULT_ENV, None)
    if spec.get("fault"):
        os.environ[FAULT_ENV] = spec["fault"]
    resolved = resolve(recipe, spec["overrides"], world_size=dist.world_size)
    try:
        with base_loaded_whole() if spec.get("load_whole") else contextlib.nullcontext():
            run = setup(resolved, dist)
    except TrainerError as e:
        return {"error": str(e)}
    base_held = held_frozen_bytes(run.engine.module)  # after the build, before any step gathers a tensor
    initial = initial_weights(run) if spec.get("initial") else None
    try:
        run_loop(run)
    finally:
        run.metrics.close()
        os.environ.pop(FAULT_ENV, None)
    result: dict[str, Any] = {"engine": type(run.engine).__name__, "base_held": base_held}
    if initial is not None:
        result["initial"] = initial
    if spec.get("logits"):
        result["logits"] = logits_of(run, spec["logits"])
    if spec.get("inspect") and result["engine"] == "ZeroEngine":
        result["offload"] = offload_facts(run)
        result["bytes"] = count_bytes(run)
    elif spec.get("inspect"):
        result["bytes"] = count_native_bytes(run)
    return result


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    setup_console(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    if any("distributed.engine=deepspeed" in o for run in spec["runs"] for o in run["overrides"]):
        import_deepspeed().accelerator.get_accelerator().is_fp16_supported = lambda: True  # test-only, see above
    results: dict[str, Any] = {}
    with distributed_context() as dist:
        for run_spec in spec["runs"]:
            results[run_spec["name"]] = one_run(run_spec, spec["recipe"], dist)
            gc.collect()  # the finished run's engine goes here, not at some allocation inside the next run
        Path(out_dir, f"rank{dist.rank}.json").write_text(json.dumps(results))


# What libstdc++ prints when a joinable std::thread is destroyed. Seen twice in about 150 launches of this probe
# (once in CI): rank 1 died of it (SIGABRT) between two runs, at the start of a DeepSpeed one, in native code
# (gloo or DeepSpeed) that creates threads; the project starts none. Over 110 launches in a row (40 alone, the
# rest two or three at a time on 2 cores) did not reproduce it. See launch().
NATIVE_ABORT = "terminate called without an active exception"


def launch(base: Path, runs: list[dict[str, Any]], recipe: Path, timeout: int = 900, nproc: int = 2
           ) -> dict[str, Any]:
    """Run this probe on `nproc` ranks (2 unless told) over `runs` (their output_dir overrides under `base`) and
    return what each rank wrote plus rank 0's log. A launch that dies of NATIVE_ABORT is run once more from clean
    output folders, with a warning that carries the first attempt's stacks (faulthandler prints every thread's
    Python stack on SIGABRT); any other failure, and a second abort, fail the test."""
    spec = base / "spec.json"
    spec.write_text(json.dumps({"recipe": str(recipe), "runs": runs}))
    # -m from the repository root: the trainer package next to these tests is the one imported
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    python_m = [sys.executable, "-m"]
    if forked_cli.can_fork(env):  # torchrun's agent and the ranks forked from pre-imported libraries
        python_m, env = forked_cli.client_command(), forked_cli.client_env(env)
    cmd = [*forked_cli.torchrun_command(python_m, nproc), "tests.deepspeed_probe", str(spec), str(base)]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[1],
                              env=env)
        if proc.returncode == 0 or attempt == 2 or NATIVE_ABORT not in proc.stderr:
            break
        warnings.warn(f"deepspeed_probe: a rank aborted in native code ({NATIVE_ABORT!r}); launching again. "
                      f"First attempt's stderr, last 6000 characters:\n{proc.stderr[-6000:]}", stacklevel=2)
        for run in runs:
            for override in run["overrides"]:
                if override.startswith("output_dir="):
                    shutil.rmtree(override.split("=", 1)[1], ignore_errors=True)
        for rank_file in base.glob("rank*.json"):
            rank_file.unlink()
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"facts": {r: json.loads((base / f"rank{r}.json").read_text()) for r in range(nproc)}, "log": proc.stderr}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
