"""`python -m trainer export RUN_OR_CHECKPOINT --out DIR`: a Hugging Face directory from a checkpoint.

The output (config.json, model.safetensors, tokenizer files) loads with `AutoModelForCausalLM.from_pretrained`
and gives the trained model's logits. Everything comes from the checkpoint itself (its `hf/` folder holds the
model config and tokenizer), so export works without the recipe's data or tokenizer source. The checkpoint is
verified against its manifest first, and nothing is unpickled. A DeepSpeed checkpoint without the gathered
weights (`checkpoint.full_weights`, off by default at ZeRO-3) has them consolidated from its shards here, in one
process, whatever number of ranks wrote it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from trainer.adapters import ADAPTER_DIR
from trainer.adapters.merge import write_adapter_export
from trainer.checkpoint.layout import MANIFEST, complete_checkpoints, read_manifest
from trainer.checkpoint.state import recorded_base
from trainer.dtypes import torch_dtype
from trainer.engine.base import MODEL_FILE
from trainer.engine.ds_shards import consolidated_weights, has_zero_checkpoint
from trainer.errors import CheckpointError
from trainer.model.inference import for_inference
from trainer.model.tokenizer import save_tokenizer
from trainer.safeio import current_umask

log = logging.getLogger(__name__)


def resolve_checkpoint(source: Path) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint of a run's output directory."""
    if (source / MANIFEST).is_file():
        return source
    if (source / "checkpoints").is_dir():
        done = complete_checkpoints(source)
        if done:
            return done[-1][1]
        raise CheckpointError(f"{source} has no complete checkpoint to export (checkpoints/ holds none with a "
                              "valid manifest)")
    raise CheckpointError(f"{source} is neither a checkpoint (no {MANIFEST}) nor a run directory (no "
                          "checkpoints/); give OUTPUT_DIR or OUTPUT_DIR/checkpoints/step-N")


def load_full_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """A full model's weights from a checkpoint: `model.safetensors`, or, in a DeepSpeed checkpoint written without
    it (checkpoint.full_weights off, the ZeRO-3 default), consolidated in this process from every rank's fp32
    master partitions, one tensor at a time (restricted loading, nothing written). Every weight must be found."""
    if (ckpt / MODEL_FILE).is_file():
        load_model(model, str(ckpt / MODEL_FILE))
        return
    if not has_zero_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} holds no {MODEL_FILE} and no DeepSpeed shards to consolidate the weights from")
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = set(dict(model.named_parameters()))
    with torch.no_grad():
        for name, tensor in consolidated_weights(ckpt):
            if name not in targets or targets[name].numel() != tensor.numel():
                raise CheckpointError(f"{ckpt}: DeepSpeed's shards hold {name} {tuple(tensor.shape)}, which this "
                                      f"model ({type(model).__name__} from hf/config.json) does not have")
            targets[name].copy_(tensor.view_as(targets[name]))
            missing.discard(name)
    if missing:
        raise CheckpointError(f"{ckpt}: DeepSpeed's shards hold no values for {sorted(missing)[:3]}")
    log.info("consolidated the weights of %s from DeepSpeed's shards (it has no %s)", ckpt, MODEL_FILE)


EXPORT_MARKER = ".trainer-export"  # in every export: `--force` replaces only a folder that has it


def run_dir_of(ckpt: Path) -> Path:
    """The run a checkpoint belongs to (OUTPUT_DIR for OUTPUT_DIR/checkpoints/step-N), else the folder itself."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def check_destination(out: Path, ckpt: Path, force: bool) -> None:
    """--out must not be the run, inside it or above it, nor a file, nor a folder that is not one of our exports
    (with --force an earlier export is replaced, never anything else)."""
    run, target = run_dir_of(ckpt).resolve(), out.resolve()
    where = "the run" if target == run else "inside the run" if run in target.parents else \
        "a folder holding the run" if target in run.parents else ""
    if where:
        raise CheckpointError(f"--out {out} is {where} it exports from ({run}); writing there could destroy its "
                              "checkpoints: choose a folder outside the run")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a directory to create")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory, or pass --force to "
                                  "replace an earlier export there")
        if not (out / EXPORT_MARKER).exists():
            raise CheckpointError(f"--out {out} is not an earlier export of this tool (no {EXPORT_MARKER} in it), so "
                                  "--force will not replace it; choose a new directory")


def export(source: Path, out: Path, *, dtype: str = "fp32", adapter_only: bool = False, merge: bool = False,
           force: bool = False) -> Path:
    """Write the Hugging Face directory `out` (atomically: a temporary folder renamed at the end)."""
    ckpt = resolve_checkpoint(source)
    read_manifest(ckpt, checksums=True)
    is_adapter = (ckpt / ADAPTER_DIR).is_dir()
    if adapter_only and merge:
        raise CheckpointError("--adapter-only and --merge exclude each other: choose the adapter alone or the "
                              "merged model")
    if (adapter_only or merge) and not is_adapter:
        raise CheckpointError(f"{ckpt} holds a full model, not an adapter: --adapter-only and --merge apply to "
                              "LoRA/QLoRA runs; export without them")
    if is_adapter and not (adapter_only or merge):
        raise CheckpointError(f"{ckpt} holds a LoRA adapter, not a full model: export with --adapter-only (a peft "
                              "adapter directory, loaded with PeftModel.from_pretrained(base, DIR)) or --merge (the "
                              "base model with the adapter merged in)")
    check_destination(out, ckpt, force)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_adapter:
        write_adapter_export(ckpt, tmp, merge=merge, dtype=torch_dtype(dtype), recorded=recorded_base(ckpt),
                             force=force)
    else:
        config = AutoConfig.from_pretrained(ckpt / "hf")
        with no_init_weights():  # every weight comes from the checkpoint
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()
        load_full_weights(model, ckpt)
        model.to(torch_dtype(dtype))
        for_inference(model).save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(AutoTokenizer.from_pretrained(ckpt / "hf"), tmp)
    (tmp / EXPORT_MARKER).write_text(f"exported from {ckpt}\n", encoding="utf-8")
    readable_by_all(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    what = "the merged model (the base was only read)" if merge else "the adapter" if adapter_only else "the model"
    log.info("exported %s from %s to %s (%s)", what, ckpt, out, dtype)
    return out


def readable_by_all(folder: Path) -> None:
    """Every file 0666 and every folder 0777, less the umask (0644 / 0755 under the usual 022), as a plain open()
    or mkdir makes them: an export is read by other accounts (a serving one), but safetensors and some tokenizer
    writers create their files 0600."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        elif path.is_file():
            path.chmod(0o666 & ~mask)
