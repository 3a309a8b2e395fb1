"""The architecture of a recipe's model (a transformers config), found without downloading weights.

From scratch (`model.config`): the recipe's dict, with the vocabulary the tokenizer needs. Pretrained
(`model.name_or_path`): a local directory, the hub cache, the table of well-known models
(trainer/recipe/known_models.py, so the shipped recipes plan offline), and only then the network (config.json, a
few kB). Errors are `ArchitectureError`s about the arguments; resolve.py turns them into recipe problems.
"""

from __future__ import annotations

from typing import Any

from trainer.errors import hub_problem
from trainer.recipe.known_models import KNOWN
from trainer.recipe.schema import ModelConfig


class ArchitectureError(ValueError):
    """The architecture cannot be built or found; `field` is the model key at fault ('config', 'name_or_path',
    'trust_remote_code')."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _custom_code(e: Exception) -> bool:
    text = str(e)
    return "trust_remote_code" in text or "does not recognize this architecture" in text


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def from_recipe(arch: dict[str, Any], vocab_size: int, special_ids: dict[str, int | None] | None = None) -> Any:
    """A from-scratch model's config: the recipe's dict, vocab_size defaulting to the tokenizer's size and the
    special token ids to the tokenizer's (None where unknown: the build sets the tokenizer's). Never a config
    class's own defaults: those are ids of its family's tokenizer (Phi-3's pad 32000, OLMo 2's eos 50279), outside
    a small vocabulary, where the embedding's padding_idx fails."""
    from transformers import AutoConfig

    values = dict(arch)
    model_type = values.pop("model_type")
    values.setdefault("vocab_size", vocab_size)
    for name in SPECIAL_IDS:
        values.setdefault(name, (special_ids or {}).get(name))
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:  # transformers' ValueError, KeyError, TypeError; huggingface_hub's StrictDataclassError
        if not isinstance(e, (ValueError, KeyError, TypeError)) and "StrictDataclass" not in type(e).__name__:
            raise
        raise ArchitectureError("config", " ".join(str(e).split())[:300]) from None


def pretrained(model: ModelConfig) -> tuple[Any, str]:
    """(config, where it was found) for model.name_or_path, trying the local places before the network."""
    from transformers import AutoConfig

    name = model.name_or_path or ""
    kwargs = {"trust_remote_code": model.trust_remote_code, "revision": model.revision}
    try:  # a local directory, or the hub cache: no network
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs), "local"
    except (OSError, ValueError) as e:
        if _custom_code(e):
            raise _needs_remote_code(name) from None
    if name in KNOWN:
        arch = dict(KNOWN[name])
        return AutoConfig.for_model(arch.pop("model_type"), **arch), "known models table"
    try:  # last resort: fetch config.json
        return AutoConfig.from_pretrained(name, **kwargs), "hub"
    except Exception as e:  # an OSError from transformers, or the HTTP client's own error without network
        if isinstance(e, (OSError, ValueError)) and _custom_code(e):
            raise _needs_remote_code(name) from None
        hub = hub_problem(e, name, fetching=True)
        if hub is None and not isinstance(e, (OSError, ValueError)):
            raise
        raise ArchitectureError("name_or_path", "cannot read this model's config.json (not a local directory, not "
                                "a known model): " + (hub or f"{str(e).splitlines()[0][:160]}; give a local "
                                                      "directory or model.config")) from None


def _needs_remote_code(name: str) -> ArchitectureError:
    return ArchitectureError("trust_remote_code", f"{name}'s architecture is not part of transformers: its code "
                             "comes with the model. Set model.trust_remote_code=true if you trust that code (it "
                             "runs on your machine)")


def with_rope_scaling(config: Any, scaling: dict[str, Any]) -> Any:
    """`config` with a RoPE scaling merged into its own RoPE settings (rope_theta and the rest are kept)."""
    text = text_config(config)
    if hasattr(text, "rope_parameters"):  # transformers 5
        text.rope_parameters = {**(text.rope_parameters or {}), **scaling}
    else:
        text.rope_scaling = {**(getattr(text, "rope_scaling", None) or {}), **scaling}
    return config


def text_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config: Any) -> int | None:
    """The longest sequence the positions support: max_position_embeddings (n_positions for GPT-2), times the
    factor of a RoPE scaling set on top of it. A scaling that names its own original_max_position_embeddings
    (Llama 3.1's llama3 type, YaRN as shipped) was already counted in max_position_embeddings by the model."""
    text = text_config(config)
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if limit is None:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") == "default" \
            or "original_max_position_embeddings" in rope:
        return int(limit)
    return int(limit * float(rope.get("factor", 1.0)))


# a transformers model class says which attention implementations it supports by these flags
_ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                    "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def model_class(config: Any) -> Any:
    """The transformers causal-LM class of a config, or None (model code that comes with the model)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def attention_problem(config: Any, requested: str) -> str | None:
    """Why this architecture cannot run the `requested` attention implementation (None when it can, or when its
    class does not say): Gemma 2 has no sdpa path, since sdpa cannot soft-cap the attention logits."""
    cls, flag = model_class(config), _ATTENTION_FLAGS.get(requested)
    if cls is None or flag is None or getattr(cls, flag, True):
        return None
    supported = ["eager", *(name for name, f in _ATTENTION_FLAGS.items() if getattr(cls, f, False))]
    return (f"{cls.__name__} ({config.model_type}) has no {requested} attention in transformers; use one of "
            f"{', '.join(supported)} (or null: its default, {default_attention(config)})")


def default_attention(config: Any) -> str:
    """The attention implementation transformers picks for this architecture when none is asked for (on a machine
    without flash-attn): sdpa where the class supports it, else eager."""
    cls = model_class(config)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def router_aux_loss_coef(config: Any) -> float:
    """The weight of a mixture-of-experts model's load-balancing loss in the training loss: its config's
    router_aux_loss_coef when output_router_logits is on (then transformers computes the loss in every forward),
    else 0. Dense models have neither."""
    text = text_config(config)
    if not getattr(text, "output_router_logits", False):
        return 0.0
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
