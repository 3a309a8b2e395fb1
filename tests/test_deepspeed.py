"""DeepSpeed ZeRO 1-3 behind the loop: same updates as DDP, sharded bytes per rank, offload, fp16 loss scaling,
stage 0 on the native engine, exact resume after SIGKILL, ZeRO-3 export, safe loading, validation rules.

Two torchrun launches of tests/deepspeed_probe.py train many recipes each (module fixtures `fp32` and `bf16`);
the resume and export tests reuse their runs as references. Tolerances (why each is what it is):
- fp32, ZeRO 1-3 vs DDP: 1e-5 on the loss. Same arithmetic; only the summation order of the gradient
  reduction differs (reduce-scatter of flat buckets vs DDP's all-reduce): measured 2.4e-7 after 10 steps.
- bf16, ZeRO 1-3 among themselves: 2e-3. DeepSpeed's bf16 keeps bf16 weights and gradients; stage 1 sums the
  micro-batch gradients in bf16 on the parameters, stages 2-3 in their reduced partitions, so the updates
  differ by bf16 rounding (8-bit mantissa); measured 1.2e-4 over 12 steps (3.5e-4 with accumulation 2). bf16
  against fp32 moves the loss by about 7e-3 here, so a stage that silently trained in another precision fails.
- offload vs not: DeepSpeedCPUAdam (a C++ loop) and torch's AdamW differ in the last bits of the fp32 master
  weights: 1e-5 in fp32 (measured ~1e-7); in bf16 a master weight that lands on the other side of a bf16
  rounding boundary moves the model by one bf16 step, so the bf16 tolerance, 2e-3 (measured 2e-4).
- resume after SIGKILL: bitwise (== on floats): DeepSpeed's checkpoint holds every partition exactly.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests import deepspeed_probe
from tests.helpers import QUICKSTART, ROOT, TEST_DATA, read_metrics, run_cli, tiny
from tests.helpers import assert_bitwise_equal, final_weights, losses, ok
from trainer.__main__ import main
from trainer.checkpoint.layout import complete_checkpoints
from trainer.errors import UnsafeFileError
from trainer.safeio import sha256

DS = ["distributed.engine=deepspeed"]
Z3_ALL_PARTITIONED = "distributed.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"
IDS = [[1, 5, 9, 100, 200, 3, 7, 42, 17, 250, 33, 8], [60, 61, 62, 63, 2, 4, 6, 8, 10, 12, 14, 16]]


def zero(stage: int, *extra: str) -> list[str]:
    """DeepSpeed at a stage; at stage 3 every parameter partitioned (DeepSpeed keeps parameters under 1e5
    elements whole by default, which in a tiny model is all of them)."""
    return [*DS, f"distributed.zero_stage={stage}", *([Z3_ALL_PARTITIONED] if stage == 3 else []), *extra]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved with save_pretrained: every engine and stage starts from the same weights (ZeRO-3
    initializes a from-scratch model through transformers' own partitioned init, with other random draws)."""
    from trainer.model.build import build_model
    from trainer.recipe.resolve import resolve
    from trainer.model.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("model") / "tiny"
    run = resolve(QUICKSTART, tiny(out))
    build_model(run, build_tokenizer(run.recipe.model)).save_pretrained(out)
    return out


def recipe(out: Path, model: Path, *extra: str, steps: int) -> list[str]:
    return tiny(out, "model.config=null", f"model.name_or_path={model}", "checkpoint.resume=never", *extra,
                steps=steps)


def probe(base: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """tests/deepspeed_probe.py on 2 ranks: {"facts": {rank: {run: facts}}, "log": rank 0's log}."""
    return deepspeed_probe.launch(base, runs, QUICKSTART)


def max_loss_diff(a: Path, b: Path) -> float:
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) > 0
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb))


FP32 = ["precision.dtype=fp32", "train.micro_batch_size=2", "train.grad_accum_steps=2", "checkpoint.save_final=false"]
FP16_FAULT = "inf_grad@3"


def dpo(base: Path, name: str) -> list[str]:
    """Full-training DPO: the reference log-probs computed before the first step, on 2 ranks, and stored in a cache
    of the run's own (so each engine computes them)."""
    return ["data.format=preference", f"data.source={TEST_DATA / 'preference_pairs.json'}", "data.chat_template=chatml",
            "data.seq_len=128", "objective.name=dpo", f"data.cache_dir={base / (name + '-cache')}"]
BIG_SCALE_POWER = 20  # a starting loss scale that overflows fp16 gradients for the first few steps


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, saved_model: Path) -> dict[str, Any]:
    """One launch: fp32 DDP and ZeRO 1-3 (accumulation 2), full-training DPO on DDP and ZeRO-3, fp16 at stage 0
    and on the native engine with an injected overflow, fp16 ZeRO 1-3 with an injected or a real overflow."""
    base = tmp_path_factory.mktemp("fp32")
    big_scale = [f"precision.initial_loss_scale={2 ** BIG_SCALE_POWER}"]
    runs = [
        ("ddp", FP32, None), ("ddp_dpo", [*FP32, *dpo(base, "ddp_dpo")], None),
        ("z1", [*FP32, *zero(1)], None), ("z2", [*FP32, *zero(2)], None),
        ("z2_offload", [*FP32, *zero(2, "distributed.offload_optimizer=cpu")], None),
        ("native_fp16", ["precision.dtype=fp16"], FP16_FAULT),
        ("z0_fp16", ["precision.dtype=fp16", *zero(0)], FP16_FAULT),
        ("z1_fp16", ["precision.dtype=fp16", *zero(1), "precision.initial_loss_scale=1024"], FP16_FAULT),
        ("z2_fp16_big_scale", ["precision.dtype=fp16", *zero(2), *big_scale], None),
        ("z3", [*FP32, *zero(3), "checkpoint.save_final=true"], None),  # ZeRO-3 last (see the probe)
        ("z3_fp16_big_scale", ["precision.dtype=fp16", *zero(3), *big_scale], None),
        ("z3_dpo", [*FP32, *zero(3), *dpo(base, "z3_dpo")], None),
    ]
    spec = [{"name": n, "overrides": recipe(base / n, saved_model, *o, steps=10), "fault": f,
             "logits": IDS if n == "z3" else None} for n, o, f in runs]
    return {"base": base, **probe(base, spec)}


# The resume tests' recipe (test_checkpoint's: micro-batch 2, a checkpoint every 4 steps, 12 steps) in bf16.
BF16 = ["precision.dtype=bf16", "train.micro_batch_size=2", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory, saved_model: Path) -> dict[str, Any]:
    """One launch: bf16 ZeRO 1-3, with and without offload, DeepSpeed's tensors counted on each rank."""
    base = tmp_path_factory.mktemp("bf16")
    offload = "distributed.offload_optimizer=cpu"
    runs = [("z1", zero(1)), ("z2", zero(2)), ("z2_offload", zero(2, offload)), ("z3", zero(3)),
            ("z3_offload", zero(3, offload, "distributed.offload_params=cpu"))]
    spec = [{"name": n, "overrides": recipe(base / n, saved_model, *BF16, *o, steps=12), "inspect": True,
             "logits": IDS if n == "z3" else None} for n, o in runs]
    return {"base": base, **probe(base, spec)}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_from_scratch_weights_do_not_depend_on_the_engine(tmp_path: Path) -> None:
    """A from-scratch recipe (bf16, 2 ranks) starts from the same weights, rounded to bf16, and the same first loss
    on the native engine and DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (ZeRO-3 builds the model already partitioned;
    it used to draw other weights and start at a loss 0.05 away); packed examples too (position ids through ZeRO-3)."""
    bf16 = ["precision.dtype=bf16", "train.micro_batch_size=2", "checkpoint.save_final=false"]
    packed = [f"data.source={TEST_DATA / 'alpaca_tasks.json'}", "data.format=alpaca", "data.packing=isolated",
              "data.seq_len=256"]  # packed examples: the position ids go through DeepSpeed's forward too
    runs = [("native", []), ("z1", zero(1)), ("z2", zero(2)), ("z3", zero(3)),
            ("native_packed", packed), ("z3_packed", [*packed, *zero(3)])]
    spec = [{"name": n, "overrides": tiny(tmp_path / n, *bf16, *o, steps=1), "initial": True} for n, o in runs]
    facts = probe(tmp_path, spec)["facts"][0]
    reference = facts["native"]["initial"]
    assert len(reference) > 10
    for name, _ in runs[1:]:
        assert facts[name]["initial"] == reference, name
    first = {name: read_metrics(tmp_path / name)[0]["loss"] for name, _ in runs}
    text = [first[n] for n in ("native", "z1", "z2", "z3")]
    assert max(text) - min(text) < 5e-3, first
    assert abs(first["native_packed"] - first["z3_packed"]) < 5e-3, first


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_fp32_zero_stages_match_ddp(fp32: dict[str, Any]) -> None:
    base = fp32["base"]
    for stage in ("z1", "z2", "z3"):
        assert fp32["facts"][0][stage]["engine"] == "ZeroEngine"
        assert max_loss_diff(base / "ddp", base / stage) <= 1e-5, stage
        for a, b in zip(read_metrics(base / "ddp"), read_metrics(base / stage)):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)  # our schedule drives DeepSpeed's optimizer
    rows = read_metrics(base / "ddp")
    assert len(rows) == 10 and rows[-1]["loss"] < rows[0]["loss"] - 0.3


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_full_training_dpo_on_zero3_matches_ddp(fp32: dict[str, Any]) -> None:
    """Full-training DPO in fp32: the reference pass under ZeRO-3 (weights gathered inside each no_grad forward,
    micro-batches shared between the ranks) stores the log-probs DDP stores, and the runs' losses and rewards agree
    up to the order of float sums."""
    base = fp32["base"]
    stored = {name: np.fromfile(next((base / f"{name}-cache").glob("*.reference/*")) / "train.bin")
              for name in ("ddp_dpo", "z3_dpo")}
    assert len(stored["ddp_dpo"]) == 160 and np.allclose(stored["z3_dpo"], stored["ddp_dpo"], rtol=1e-6, atol=1e-5)
    ddp, z3 = read_metrics(base / "ddp_dpo"), read_metrics(base / "z3_dpo")
    assert len(ddp) == len(z3) == 10 and ddp[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(ddp, z3):
        for name in ("loss", "rewards_chosen", "rewards_rejected", "logps_chosen"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), (a["step"], name)
    assert all(abs(r["rewards_chosen"]) > 1e-4 for r in ddp[1:])  # the policy moved away from its reference


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_bf16_zero_stages_agree(bf16: dict[str, Any]) -> None:
    base = bf16["base"]
    for a, b in (("z1", "z2"), ("z1", "z3"), ("z2", "z3")):
        assert max_loss_diff(base / a, base / b) <= 2e-3, (a, b)
    rows = read_metrics(base / "z1")
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"] - 0.3


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero3_logs_the_full_parameter_count(bf16: dict[str, Any]) -> None:
    """ZeRO-3 leaves empty placeholders in the model; the model log line still counts the full parameters."""
    counts = re.findall(r"model: \w+, ([\d.]+)M parameters", bf16["log"])
    assert len(counts) == 5 and len(set(counts)) == 1 and float(counts[0]) > 0, counts


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_bytes_per_rank_fall_as_zero_says(bf16: dict[str, Any]) -> None:
    """Mixed-precision Adam holds 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master, two moments) bytes
    per parameter. Over N=2 ranks ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    Slack: DeepSpeed pads partitions for alignment (under 1%), and ZeRO-2 keeps the whole gradient of the one
    parameter per group that straddles its partition's boundary (a few % of a large model, a lot of a tiny one)."""
    for rank in (0, 1):
        got = {s: bf16["facts"][rank][s]["bytes"] for s in ("z1", "z2", "z3")}
        n = got["z1"]["numel"]
        assert {g["numel"] for g in got.values()} == {n}

        def approx(value: int, per_param: float, extra: int = 0) -> bool:
            return -0.01 * per_param * n - 256 <= value - per_param * n <= 0.01 * per_param * n + 256 + extra

        for stage, b in got.items():
            assert approx(b["master"], 4 / 2), (rank, stage, b)  # fp32 master, 1/N of it
            assert approx(b["moments"], 8 / 2), (rank, stage, b)  # exp_avg + exp_avg_sq, 1/N
        straddle = 2 * got["z2"]["straddle_numel"]
        assert approx(got["z1"]["grads"], 2), got["z1"]
        assert approx(got["z2"]["grads"], 2 / 2, extra=straddle), got["z2"]
        assert approx(got["z3"]["grads"], 2 / 2), got["z3"]
        assert approx(got["z1"]["params"], 2) and approx(got["z2"]["params"], 2), got
        assert approx(got["z3"]["params"], 2 / 2), got["z3"]
        states = {s: b["params"] + b["grads"] + b["master"] + b["moments"] for s, b in got.items()}
        assert states["z1"] > states["z2"] > states["z3"], states  # 10, 9 (+ straddle), 8 bytes per parameter


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_offload_keeps_optimizer_state_in_cpu_memory_and_trains_the_same(bf16: dict[str, Any],
                                                                        fp32: dict[str, Any]) -> None:
    base = bf16["base"]
    for rank in (0, 1):
        for run in ("z2_offload", "z3_offload"):
            facts = bf16["facts"][rank][run]["offload"]
            assert facts["optimizer"] == "DeepSpeedCPUAdam" and facts["devices"] == ["cpu"], facts
            assert facts["dtypes"] == ["torch.float32"] and facts["offload_optimizer"], facts
        assert bf16["facts"][rank]["z3_offload"]["offload"]["offload_params"]
        assert bf16["facts"][rank]["z2"]["offload"]["optimizer"] == "AdamW"
    assert max_loss_diff(base / "z2", base / "z2_offload") <= 2e-3
    assert max_loss_diff(base / "z3", base / "z3_offload") <= 2e-3
    fp32_base = fp32["base"]  # without bf16 rounding the two optimizers' updates agree to float precision
    assert max_loss_diff(fp32_base / "z2", fp32_base / "z2_offload") <= 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_fp16_overflow_skips_the_step_and_halves_the_scale(fp32: dict[str, Any]) -> None:
    """An inf in a gradient at step 3 (TRAINER_FAULT, injected into p.grad, where ZeRO-1 keeps gradients until
    the step) and real overflows from a 2**20 starting scale at ZeRO-2/3 (where gradients live in partitions)."""
    base = fp32["base"]
    rows = read_metrics(base / "z1_fp16")
    assert [r["skipped_steps"] for r in rows[:4]] == [0, 0, 1, 1]
    assert [r["loss_scale"] for r in rows[:4]] == [1024.0, 1024.0, 1024.0, 512.0]  # a scale that fits: only step 3
    assert rows[-1]["loss"] < rows[0]["loss"]
    for run in ("z2_fp16_big_scale", "z3_fp16_big_scale"):
        rows = read_metrics(base / run)
        assert rows[0]["loss_scale"] == 2.0 ** BIG_SCALE_POWER and rows[0]["skipped_steps"] == 1, run
        for before, after in zip(rows, rows[1:]):
            overflowed = after["skipped_steps"] - before["skipped_steps"]  # 1 when the step `after` was skipped
            assert overflowed == _skipped(after), run  # skipped exactly when the gradients overflowed
            assert after["loss_scale"] == before["loss_scale"] / (2 ** _skipped(before)), run  # and halved
        assert 2 <= rows[-1]["skipped_steps"] <= len(rows) // 2, run  # it trains once the scale fits
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, run


def _skipped(row: dict[str, Any]) -> int:
    """1 when this row's step was skipped: its grad norm is inf (DeepSpeed and the native engine report it)."""
    return int(row["grad_norm"] == float("inf"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_stage0_fp16_runs_on_the_native_engine_with_loss_scaling(fp32: dict[str, Any]) -> None:
    """DeepSpeed's own stage 0 never scales an fp16 loss (PR #8393): the recipe trains on the native engine
    instead, bit for bit like a native recipe, with its loss scaling (the injected overflow skips and halves)."""
    base = fp32["base"]
    assert fp32["facts"][0]["z0_fp16"]["engine"] == "NativeEngine"
    assert "distributed.zero_stage=0: running on the native engine" in fp32["log"]
    z0, native = read_metrics(base / "z0_fp16"), read_metrics(base / "native_fp16")
    assert [r["loss"] for r in z0] == [r["loss"] for r in native]
    assert [r["loss_scale"] for r in z0[:4]] == [65536.0, 65536.0, 65536.0, 32768.0]
    assert z0[2]["skipped_steps"] == 1


def _export_and_compare(run: Path, logits: list, dtype: str, tol: float, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run), "--out", str(out), "--dtype", dtype]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor(IDS)).logits.float()
    assert (got - torch.tensor(logits)).abs().max().item() <= tol


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero3_export_reproduces_the_logits(fp32: dict[str, Any], bf16: dict[str, Any], tmp_path: Path) -> None:
    """The checkpoint holds the fp32 master weights gathered from the ZeRO-3 partitions (model.safetensors);
    export writes one Hugging Face directory. fp32: the trained model's logits to float precision. bf16: the
    engine computed with the bf16 rounding of those same weights, which the bf16 export reproduces."""
    assert (fp32["base"] / "z3" / "checkpoints" / "step-000010" / "deepspeed").is_dir()
    _export_and_compare(fp32["base"] / "z3", fp32["facts"][0]["z3"]["logits"], "fp32", 1e-4, tmp_path / "fp32")
    _export_and_compare(bf16["base"] / "z3", bf16["facts"][0]["z3"]["logits"], "bf16", 0.1, tmp_path / "bf16")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_then_resume_is_bitwise_exact(stage: int, bf16: dict[str, Any], saved_model: Path,
                                              tmp_path: Path) -> None:
    """test_checkpoint's harness: killed after step 9, resumed from step 8, against the uninterrupted run."""
    ref, out = bf16["base"] / f"z{stage}", tmp_path / "run"
    args = ["train", str(QUICKSTART), *recipe(out, saved_model, *BF16, *zero(stage), "checkpoint.resume=auto",
                                              steps=12)]
    killed = run_cli(args, nproc=2, env={"TRAINER_FAULT": "sigkill@9"})
    assert killed.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [4, 8]
    assert (out / "checkpoints" / "step-000008" / "deepspeed" / "state").is_dir()
    resumed = ok(run_cli(args, nproc=2))
    assert "resume: auto picked step-000008" in resumed.stderr
    assert losses(out, range(1, 13)) == losses(ref, range(1, 13))  # bitwise: == on floats
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    assert_bitwise_equal(final_weights(out), final_weights(ref))


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_crafted_pickle_in_a_deepspeed_shard_is_refused(bf16: dict[str, Any], saved_model: Path,
                                                        tmp_path: Path) -> None:
    """An attacker replaces rank 0's ZeRO shard with a torch file holding a code-running object (and fixes the
    manifest): both ranks refuse before loading anything, with one message and no traceback."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(bf16["base"] / "z2" / "checkpoints" / "step-000012", out / "checkpoints" / "step-000012")
    ckpt = out / "checkpoints" / "step-000012"
    shard = next((ckpt / "deepspeed" / "state").glob("*zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": _Payload(marker)}, shard)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    name = shard.relative_to(ckpt).as_posix()
    manifest["files"][name] = {"size": shard.stat().st_size, "sha256": sha256(shard)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(["train", str(QUICKSTART), *recipe(out, saved_model, *BF16, *zero(2), "checkpoint.resume=auto",
                                                      steps=14)], nproc=2)
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and shard.name in proc.stderr
    ours = re.escape(f'File "{ROOT / "trainer"}/')  # the package's files (the checkout may itself be named trainer)
    assert not re.search(ours + r'|\[rank\d\]: Traceback', proc.stderr)  # no traceback from our ranks
    assert not marker.exists()


def test_safe_load_accepts_deepspeed_types_and_refuses_code(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from trainer.engine.deepspeed import check_files, safe_load

    good = tmp_path / "good" / "state.pt"
    good.parent.mkdir()
    torch.save({"scaler": DynamicLossScaler(init_scale=1024.0, scale_window=10, min_scale=1, delayed_shift=1,
                                                  consecutive_hysteresis=False),
                "stage": ZeroStageEnum.gradients, "where": fragment_address(numel=3, start=4),
                "t": torch.arange(3)}, good)
    check_files(good.parent)
    loaded = safe_load(str(good))
    assert loaded["scaler"].cur_scale == 1024.0 and loaded["stage"] is ZeroStageEnum.gradients
    assert loaded["where"] == fragment_address(numel=3, start=4) and torch.equal(loaded["t"], torch.arange(3))
    marker = tmp_path / "pwned"
    for name, write in (("zip", lambda f: torch.save({"x": _Payload(marker)}, f)),
                        ("pickle", lambda f: f.write_bytes(pickle.dumps({"x": _Payload(marker)})))):
        bad = tmp_path / name / "state.pt"
        bad.parent.mkdir()
        write(bad)
        with pytest.raises(UnsafeFileError):
            check_files(bad.parent)
        with pytest.raises((UnsafeFileError, RuntimeError)):
            safe_load(str(bad))
    assert not marker.exists()


@pytest.mark.slow  # a fresh interpreter (what it imports, or its memory limit, is checked)
def test_validate_prints_the_generated_deepspeed_config_without_torch_distributed() -> None:
    """`validate` prints the recipe, then `---` and the DeepSpeed config as JSON; it neither imports DeepSpeed
    nor starts torch.distributed."""
    code = ("import sys, torch.distributed as d; from trainer.__main__ import main; rc = main(sys.argv[1:]); "
            "assert rc == 0 and 'deepspeed' not in sys.modules and not d.is_initialized()")
    args = ["validate", str(QUICKSTART), *zero(3), "precision.dtype=fp16", "distributed.offload_optimizer=cpu",
            "train.micro_batch_size=2", "train.grad_accum_steps=null", "train.global_batch_size=16",
            "optimizer.grad_clip=0.5",
            "precision.loss_scale_growth_interval=500",
            "distributed.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0, "
            "reduce_bucket_size: 1000}}", "--world-size", "4"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, _, tail = proc.stdout.partition("\n---\n")
    recipe_doc = yaml.safe_load(head)
    ds = json.loads("\n".join(line for line in tail.splitlines() if not line.startswith("#")))
    assert recipe_doc["distributed"]["zero_stage"] == 3
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (2, 2, 16)
    assert ds["managed_gradient_accumulation"] is False and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                       "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000}
    assert ds["fp16"]["initial_scale_power"] == 16 and ds["fp16"]["loss_scale_window"] == 500
    assert ds["fp16"]["hysteresis"] == 1 and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.01}}  # DeepSpeedCPUAdam: no torch_adam
    assert "changed by distributed.deepspeed_overrides: zero_optimization.reduce_bucket_size: None -> 1000" \
        in proc.stdout


# (overrides on top of engine=deepspeed, the key the message must name, a fragment of the advice)
BAD = [
    (["distributed.zero_stage=2", "distributed.offload_optimizer=cpu", "optimizer.name=sgd"], "optimizer.name",
     "DeepSpeedCPUAdam"),
    (["distributed.zero_stage=0", "distributed.offload_optimizer=cpu"], "distributed.offload_optimizer",
     "zero_stage: 1, 2 or 3"),
    (["distributed.zero_stage=2", "distributed.offload_params=cpu"], "distributed.offload_params", "zero_stage: 3"),
    (["distributed.zero_stage=1", "precision.dtype=fp16", "precision.initial_loss_scale=1000"],
     "precision.initial_loss_scale", "power of two"),
    (["distributed.zero_stage=0", "distributed.deepspeed_overrides={zero_optimization: {overlap_comm: true}}"],
     "distributed.deepspeed_overrides", "native engine"),
    (["distributed.zero_stage=2", "distributed.deepspeed_overrides={train_batch_size: 64}"],
     "distributed.deepspeed_overrides.train_batch_size", "train.global_batch_size"),
    (["distributed.zero_stage=2", "distributed.deepspeed_overrides={zero_optimization: {stage: 3}}"],
     "distributed.deepspeed_overrides.zero_optimization.stage", "distributed.zero_stage"),
    (["distributed.zero_stage=2", "distributed.deepspeed_overrides={scheduler: {type: WarmupLR}}"],
     "distributed.deepspeed_overrides.scheduler", "optimizer.schedule"),
    (["distributed.zero_stage=2", "optimizer.name=galore_adamw"], "optimizer.name", "GaLore"),
    (["distributed.zero_stage=3", "adapter.type=qlora", "adapter.quant.storage_dtype=uint8", "model.config=null",
      f"model.name_or_path={ROOT}"], "adapter.quant.storage_dtype", "PR #8073"),
    (["distributed.zero_stage=1", "adapter.type=lora", "precision.dtype=fp16", "model.config=null",
      f"model.name_or_path={ROOT}"], "precision.dtype", "torch.autocast"),
]


@pytest.mark.parametrize("overrides,key,advice", BAD, ids=[" ".join(b[0])[:60] for b in BAD])
def test_impossible_deepspeed_recipes_are_refused_at_validation(overrides: list[str], key: str, advice: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(QUICKSTART), *DS, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"  - {key} = " in err, err
    assert advice in err, err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_process_without_torchrun(tmp_path: Path) -> None:
    """`python -m trainer train` with DeepSpeed and no torchrun: the engine makes a one-rank group itself (no
    MPI discovery), ZeRO-3 trains and checkpoints; a DeepSpeed override DeepSpeed rejects is one recipe error."""
    out = tmp_path / "run"
    proc = ok(run_cli(["train", str(QUICKSTART), *tiny(out, *zero(3), "precision.dtype=bf16", steps=3)]))
    assert "one process without torchrun" in proc.stderr
    assert [s for s, _ in complete_checkpoints(out)] == [3]
    bad = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "bad", *zero(2),
                                                   "distributed.deepspeed_overrides={zero_optimization: "
                                                   "{overlap_commm: true}}", steps=1)])
    assert bad.returncode == 2
    assert "distributed.deepspeed_overrides" in bad.stderr and "overlap_commm" in bad.stderr
    assert "Traceback" not in bad.stderr
