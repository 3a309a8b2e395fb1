"""Using a trained model: `python -m trainer generate RUN_OR_EXPORT --prompt TEXT` continues a text, and
`python -m trainer chat RUN_OR_EXPORT` holds a conversation with the chat template the run trained with.

The model comes from a run (its newest complete checkpoint), a checkpoint folder, or an export: a full model; an
adapter run's checkpoint or an `--adapter-only` export, loaded over its base (quantized as in training for
QLoRA); or a merged export. It runs with the KV cache, in bf16 on a GPU when there is one, else fp32 on the CPU.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from trainer.adapters import ADAPTER_DIR
from trainer.adapters.base_identity import identify
from trainer.adapters.merge import BASE_FILE, load_base, trained_base, warn_if_other_base
from trainer.checkpoint import read_manifest, recorded_base
from trainer.errors import TrainerError
from trainer.export import load_full_weights, resolve_checkpoint
from trainer.inference import for_inference
from trainer.recipe import saved_recipe

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    what: str  # for the first line the user sees


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda", 0), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _from_checkpoint(ckpt: Path, device: torch.device, dtype: torch.dtype) -> Any:
    read_manifest(ckpt, checksums=True)
    if (ckpt / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        recipe = saved_recipe(ckpt / "config.yaml")
        model_cfg = trained_base(ckpt / ADAPTER_DIR, recipe.model)
        warn_if_other_base(ckpt, recorded_base(ckpt), identify(model_cfg.name_or_path or "", model_cfg.revision))
        base = load_base(model_cfg, recipe.adapter, recipe.precision.dtype, device)
        return PeftModel.from_pretrained(base, str(ckpt / ADAPTER_DIR))
    with no_init_weights():  # every weight comes from the checkpoint
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "hf"), dtype=torch.float32)
    model.tie_weights()
    load_full_weights(model, ckpt)  # model.safetensors, or consolidated from DeepSpeed's shards
    return model.to(device=device, dtype=dtype)


def _from_export(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():  # an --adapter-only export: the base named in it, then the adapter
        from peft import PeftModel

        base_name = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base_name:
            raise TrainerError(f"{adapter_config} does not name its base model (base_model_name_or_path)")
        recorded = _recorded_base_of_export(folder)
        if recorded is not None:
            warn_if_other_base(folder, recorded, identify(base_name))
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype).to(device)
        return PeftModel.from_pretrained(base, str(folder))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)


def _recorded_base_of_export(folder: Path) -> dict[str, Any] | None:
    """The identity of the base an --adapter-only export of ours was trained on (None: another tool's adapter)."""
    try:
        recorded = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def load(source: Path) -> Loaded:
    """The model and tokenizer behind a run, a checkpoint or an export, ready for generation."""
    device, dtype = _device()
    if not source.exists():
        raise TrainerError(f"{source} does not exist; give a run's output_dir, a checkpoint folder or an export")
    if (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
        model, tok_dir, what = _from_export(source, device, dtype), source, f"export {source}"
    else:
        ckpt = resolve_checkpoint(source)
        model, tok_dir, what = _from_checkpoint(ckpt, device, dtype), ckpt / "hf", f"checkpoint {ckpt}"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    for_inference(model).eval()
    return Loaded(model, tokenizer, device, what)


def _generate(loaded: Loaded, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> list[int]:
    """New token ids after `ids`: greedy at temperature 0, else sampled (top-p 0.9), reproducible by seed."""
    torch.manual_seed(seed)
    tok = loaded.tokenizer
    inputs = torch.tensor([ids], device=loaded.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=True,
                                    max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id, **sampling)
    return out[0, inputs.size(1):].tolist()


def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
    """The continuation of a plain text prompt (no chat template)."""
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return loaded.tokenizer.decode(_generate(loaded, ids, max_new_tokens, temperature, seed), skip_special_tokens=True)


def reply(loaded: Loaded, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.7,
          seed: int = 0) -> str:
    """The assistant's next turn, rendered with the tokenizer's chat template and cut at its end-of-turn marker."""
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise TrainerError("this model's tokenizer has no chat template (it was not trained on chats); use "
                           "`python -m trainer generate` for plain text")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok.decode(_generate(loaded, ids, max_new_tokens, temperature, seed), skip_special_tokens=False)
    for stop in ("<|im_end|>", tok.eos_token or ""):
        if stop and stop in answer:
            answer = answer[:answer.index(stop)]
    return answer.strip()


def chat_loop(loaded: Loaded, read: TextIO = sys.stdin, write: TextIO = sys.stdout, max_new_tokens: int = 256,
              temperature: float = 0.7, system: str | None = None) -> None:
    """Read user turns until end of input or /exit; /reset starts a new conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write.write(f"chatting with {loaded.what} on {loaded.device} (/reset starts over, /exit or Ctrl-D quits)\n")
    while True:
        write.write("you> ")
        write.flush()
        line = read.readline()
        if not line or line.strip() == "/exit":
            write.write("\n")
            return
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = reply(loaded, messages, max_new_tokens, temperature, seed=len(messages))
        messages.append({"role": "assistant", "content": answer})
        write.write(f"model> {answer}\n")

