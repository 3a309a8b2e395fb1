"""Build the tokenizer a run uses: the built-in byte-level one, or any `from_pretrained` tokenizer.

The byte tokenizer exists so a from-scratch quickstart needs no download: every UTF-8 string maps to its
bytes (ids 0-255, one token per byte), so any text round-trips exactly. Whatever the source, the result
always has an EOS token (documents are separated by it) and a pad token (micro-batches are padded with it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.errors import fetching_from_hub
from trainer.recipe.schema import DataConfig, ModelConfig

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
BYTE_VOCAB_SIZE = 256 + 3  # the 256 bytes, then PAD, BOS, EOS (resolve.py sizes a model by it without building)
BYTE_SPECIAL_IDS = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}


def _byte_alphabet() -> dict[int, str]:
    """Byte -> printable character, the standard byte-level BPE alphabet.

    Byte-level pre-tokenization turns each byte into one of these characters, so the vocabulary below
    needs exactly 256 entries and no unknown token can ever occur.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + shifted)
            shifted += 1
    return alphabet


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (id = byte value) then `<pad>`=256, `<s>`=257, `</s>`=258.

    A BPE model with no merges over the byte alphabet: the `tokenizers` pipeline gives offsets mapping,
    batch encoding in Rust and a `tokenizer.json` that `AutoTokenizer` loads back.
    """
    vocab = {char: byte for byte, char in _byte_alphabet().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def build_tokenizer(cfg: ModelConfig, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """The run's tokenizer, guaranteed to have an EOS and a pad token. `local_files_only`: a directory or the hub
    cache, never the network (OSError when it is not there); else a hub fetch that fails is a HubError."""
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    name = cfg.tokenizer or cfg.name_or_path
    if not name:
        raise ValueError("model.tokenizer = null and model.name_or_path = null: give model.tokenizer "
                         "('byte', a directory or a hub id)")
    # the local-only attempt is a probe whose failure the caller expects (an OSError); a fetch that fails says why
    with contextlib.nullcontext() if local_files_only else fetching_from_hub(name):
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                                            local_files_only=local_files_only)
    return ensure_special_tokens(tok)


def ensure_special_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add an EOS if missing (grows the vocabulary: the model must resize its embeddings) and pad = EOS if
    there is no pad token. Padding is always masked by attention_mask and labels, never by pad id, so
    sharing the id with EOS does not hide real EOS tokens from the loss."""
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
        log.warning("tokenizer had no EOS token; added %r (id %d): the model's embeddings must be resized "
                    "to len(tokenizer)=%d", EOS, tok.eos_token_id, len(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, path: Path) -> None:
    """`tok.save_pretrained(path)`, recording `unk_token: null` when it has no unknown token. transformers 5 loads a
    folder whose config.json names some model types (qwen2 among them) with that model's own tokenizer class,
    whatever tokenizer_config.json says, and Qwen2's adds its default unknown token `<|endoftext|>` when the file
    names none: one token more than the model's embeddings have rows, so a from-scratch Qwen2 on the byte tokenizer
    could not be fine-tuned from its own export (adapters refuse a tokenizer larger than the embeddings)."""
    tok.save_pretrained(path)
    if tok.unk_token is not None:
        return
    file = Path(path) / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    config["unk_token"] = None
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ chat templates

# ChatML, written for transformers' Jinja settings (trim_blocks: a newline right after a block tag is
# dropped, hence the explicit '\n' expressions). Tools, when a row has them, go into the system turn.
CHATML = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "# Tools\nTo call a function, reply with a JSON object {\"name\": ..., \"arguments\": ...}. Functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Messages = list[dict[str, str]]
Span = tuple[int, int]


def resolve_chat_template(chat_template: str | None, tok: PreTrainedTokenizerBase) -> str | None:
    """data.chat_template: 'chatml' is the built-in ChatML, another string a Jinja template; null means the
    tokenizer's own (returned as None, which tells transformers to use it) or ChatML if it has none."""
    if chat_template == "chatml":
        return CHATML
    if chat_template:
        return chat_template
    return None if getattr(tok, "chat_template", None) else CHATML


def settle_chat_template(tok: PreTrainedTokenizerBase, data: DataConfig) -> str:
    """Give the tokenizer the chat template the run trains with, so the checkpoints' and exports' tokenizers render a
    conversation exactly as training did. Returns which template it is, for the log ('' for plain text)."""
    if data.format == "text":
        return ""
    if data.chat_template == "chatml":
        tok.chat_template = CHATML
        return "ChatML (data.chat_template: chatml)"
    if data.chat_template:
        tok.chat_template = data.chat_template
        return "the recipe's (data.chat_template)"
    if getattr(tok, "chat_template", None):
        return "the tokenizer's own"
    tok.chat_template = CHATML
    return "ChatML: the tokenizer has none and data.chat_template is not set (set it to choose another)"


class ChatRenderer:
    """Renders a conversation and finds the characters of each assistant reply, end-of-turn marker included.

    A reply is what a model generates after the generation prompt: the text between
    render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]), less the whitespace after the
    end-of-turn marker. Templates that rewrite earlier turns (e.g. drop old reasoning) break that prefix
    property; for them the reply is searched in the full render and the template's end-of-turn marker,
    probed once, appended. Problems raise ValueError with a reason fit for a warning.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, template: str | None) -> None:
        self.tok, self.template = tok, template
        probe = "\x1ereply\x1e"
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
            self.marker = text[text.index(probe) + len(probe):].rstrip()
        except Exception:
            self.marker = ""

    def render(self, messages: Messages, tools: list | None = None, gen: bool = False) -> str:
        return str(self.tok.apply_chat_template(messages, tools=tools, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=gen))

    def spans(self, messages: Messages, tools: list | None = None) -> tuple[str, list[Span]]:
        """The full render and the (start, end) character span of every assistant reply in it."""
        try:
            full = self.render(messages, tools)
        except Exception as e:
            raise ValueError(f"the chat template failed: {type(e).__name__}: {str(e)[:120]}") from e
        spans: list[Span] = []
        cursor = 0  # walks past every turn found so far, so a reply is never matched inside a prompt
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] != "assistant":
                at = full.find(content, cursor) if content else -1
                cursor = at + len(content) if at >= 0 else cursor
                continue
            span = self._rendered(messages, i, tools, full, cursor, content) or self._found(content, full, cursor)
            if span is None:
                raise ValueError(f"assistant turn {i} not found in the rendered chat template")
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _rendered(self, messages: Messages, i: int, tools: list | None, full: str, cursor: int,
                  content: str) -> Span | None:
        try:
            head = self.render(messages[:i], tools, gen=True)
            upto = self.render(messages[:i + 1], tools)
        except Exception:
            return None
        end = len(upto.rstrip())
        if not (cursor <= len(head) < end and upto.startswith(head) and full.startswith(upto)):
            return None
        # Where the reply text itself begins: skips a role header left in by a template that ignores
        # add_generation_prompt, and whitespace the template puts before the reply.
        text = content.strip()
        at = full.find(text, len(head), end) if text else -1
        return (at if at >= 0 else len(head)), end

    def _found(self, content: str, full: str, cursor: int) -> Span | None:
        start = full.find(content, cursor) if content else -1
        if start < 0:
            return None
        end = start + len(content)
        if self.marker and full.startswith(self.marker, end):
            end += len(self.marker)
        return start, end
