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
from trainer.adapters.experts import split_experts
from trainer.adapters.merge import BASE_FILE, load_base, trained_base, warn_if_other_base
from trainer.recipe.architecture import max_positions
from trainer.checkpoint.layout import read_manifest
from trainer.checkpoint.state import recorded_base
from trainer.model.causal_lm import CausalLM
from trainer.errors import TrainerError, fetching_from_hub
from trainer.use.export import load_full_weights, resolve_checkpoint
from trainer.model.inference import for_inference
from trainer.recipe.read import saved_recipe

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    what: str  # for the first line the user sees
    context: int | None = None  # positions the model supports (max_position_embeddings); None: unknown


class TooLong(TrainerError):
    """A prompt, or a chat's latest message with the system prompt, that leaves no room in the model's context."""


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
        with fetching_from_hub(base_name):
            base: CausalLM = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        split_experts(base)  # a mixture-of-experts base as training held it: LoRA on its experts finds them
        return PeftModel.from_pretrained(base.to(device), str(folder))
    model: CausalLM = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device)


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
    return Loaded(model, tokenizer, device, what, context=max_positions(model.config))


def _generate(loaded: Loaded, ids: list[int], max_new_tokens: int, temperature: float, seed: int,
              stops: dict[str, Any]) -> list[int]:
    """New token ids after `ids`: greedy at temperature 0, else sampled (top-p 0.9), reproducible by seed; ends at
    what `stops` names (eos_token_id, stop_strings)."""
    torch.manual_seed(seed)
    inputs = torch.tensor([ids], device=loaded.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=True,
                                    max_new_tokens=max_new_tokens, pad_token_id=loaded.tokenizer.pad_token_id,
                                    **stops, **sampling)
    return out[0, inputs.size(1):].tolist()


def _eos(tok: PreTrainedTokenizerBase) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
    """The continuation of a plain text prompt (no chat template), at most to the end of the model's context."""
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = loaded.context - len(ids) if loaded.context else max_new_tokens
    if room < 1:
        raise TooLong(f"the prompt is {len(ids)} tokens and the model's context {loaded.context}: no room to "
                      "continue it; give a shorter prompt")
    if room < max_new_tokens:
        log.warning("generating %d tokens instead of %d: the prompt's %d and the model's context of %d leave no "
                    "room for more", room, max_new_tokens, len(ids), loaded.context)
    new = _generate(loaded, ids, min(max_new_tokens, room), temperature, seed, {"eos_token_id": _eos(loaded.tokenizer)})
    return str(loaded.tokenizer.decode(new, skip_special_tokens=True))


END_OF_TURN_PROBE = "\u2063end-of-turn probe\u2063"


def end_of_turn(tok: PreTrainedTokenizerBase) -> str | None:
    """The marker the chat template writes after an assistant's message (<|im_end|> for ChatML, <|eot_id|> for
    Llama 3, ...): found by rendering one exchange, so any template works. None when the template shows none."""
    exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
    try:
        text = str(tok.apply_chat_template(exchange, tokenize=False))
    except Exception as e:  # a template with rules of its own (a required system turn, ...): fall back to EOS
        log.debug("chat template rendering for the end-of-turn marker failed: %s", e)
        return None
    after = text.split(END_OF_TURN_PROBE, 1)[1].split() if END_OF_TURN_PROBE in text else []
    return after[0] if after else None


def turn_stops(tok: PreTrainedTokenizerBase, marker: str | None) -> dict[str, Any]:
    """generate()'s arguments that end a reply at the end-of-turn marker or EOS: the marker's id among the EOS ids
    when it is one token, else a stop string (the byte tokenizer spells <|im_end|> in 10 tokens)."""
    eos = _eos(tok)
    if not marker:
        return {"eos_token_id": eos}
    marker_ids = tok(marker, add_special_tokens=False)["input_ids"]
    if len(marker_ids) == 1:
        return {"eos_token_id": [*eos, marker_ids[0]]}
    return {"eos_token_id": eos, "stop_strings": [marker], "tokenizer": tok}


@dataclass(frozen=True)
class Fitted:
    """A conversation cut to the model's context: the prompt's token ids, the tokens the reply may have, and how
    many of the oldest messages were left out for it."""

    ids: list[int]
    new_tokens: int
    left_out: int


def fit(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], context: int | None,
        max_new_tokens: int) -> Fitted:
    """The conversation rendered with the chat template, its oldest exchanges left out (the system prompt kept)
    until the prompt leaves the reply min(max_new_tokens, context / 2) tokens; the reply capped to the rest of the
    context. TooLong when the system prompt and the latest message alone leave no room."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    reserve = min(max_new_tokens, context // 2) if context else 0
    dropped = 0
    while True:
        text = tok.apply_chat_template(system + turns[dropped:], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        room = context - len(ids) if context else max_new_tokens
        later_user = [i for i in range(dropped + 1, len(turns)) if turns[i]["role"] == "user"]
        if room >= reserve or not later_user:  # fits, or only the latest exchange is left
            break
        dropped = later_user[0]  # one whole exchange: a user message and the answer to it
    if room < 1:
        raise TooLong(f"that message is {len(ids)} tokens with the template{' and the system prompt' if system else ''}"
                      f", and the model's context is {context}: write a shorter one")
    return Fitted(ids, min(max_new_tokens, room), dropped)


def reply(loaded: Loaded, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.7,
          seed: int = 0) -> tuple[str, int]:
    """The assistant's next turn (rendered with the tokenizer's chat template, generated until its end-of-turn
    marker, within the model's context) and how many of the oldest messages had to be left out for it."""
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise TrainerError("this model's tokenizer has no chat template (it was not trained on chats); use "
                           "`python -m trainer generate` for plain text")
    fitted = fit(tok, messages, loaded.context, max_new_tokens)
    marker = end_of_turn(tok)
    new = _generate(loaded, fitted.ids, fitted.new_tokens, temperature, seed, turn_stops(tok, marker))
    answer = str(tok.decode(new, skip_special_tokens=False))
    for stop in (marker, tok.eos_token):
        if stop and stop in answer:
            answer = answer[:answer.index(stop)]
    return answer.strip(), fitted.left_out


def chat_loop(loaded: Loaded, read: TextIO = sys.stdin, write: TextIO = sys.stdout, max_new_tokens: int = 256,
              temperature: float = 0.7, system: str | None = None) -> None:
    """Read user turns until end of input or /exit; /reset starts a new conversation. A conversation longer than
    the model's context loses its oldest exchanges (the system prompt stays), which it says once."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    told = False
    write.write(f"chatting with {loaded.what} on {loaded.device} (/reset starts over, /exit or Ctrl-D quits)\n")
    while True:
        write.write("you> ")
        write.flush()
        line = read.readline()
        if not line or line.strip() == "/exit":
            write.write("\n")
            return
        if line.strip() == "/reset":
            messages, told = list(start), False
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            answer, left_out = reply(loaded, messages, max_new_tokens, temperature, seed=len(messages))
        except TooLong as e:
            messages.pop()
            write.write(f"({e})\n")
            continue
        if left_out:
            del messages[len(start):len(start) + left_out]  # gone for good: the conversation only grows
            if not told:
                write.write(f"(the conversation no longer fits the model's context of {loaded.context} tokens: "
                            "its oldest exchanges are left out from here on; /reset starts over)\n")
                told = True
        messages.append({"role": "assistant", "content": answer})
        write.write(f"model> {answer}\n")

