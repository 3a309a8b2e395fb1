"""The byte tokenizer round-trips any text and survives save/load; chat spans cover exactly the replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.recipe.schema import ModelConfig
from trainer.model.tokenizer import CHATML, ChatRenderer, build_tokenizer, byte_tokenizer, resolve_chat_template

TEXTS = [
    "",
    "plain ascii",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\nnewlines\n\n\n",
    "héllo wörld, ½ ¾ ÿ",
    "日本語のテキスト",
    "emoji 🎉👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01\x7f control bytes",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_ids_are_the_utf8_bytes_and_round_trip(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok) == 259
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.decode([104, 105, 258]) == "hi</s>"
    assert tok.decode([104, 105, 258], skip_special_tokens=True) == "hi"


def test_offsets_point_at_the_character_of_each_byte(tok: PreTrainedTokenizerFast) -> None:
    text = "aé日🎉 z"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    assert [tuple(o) for o in enc["offset_mapping"]] == expected


def test_save_and_load_back_with_auto_tokenizer(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (256, 257, 258)
    assert build_tokenizer(ModelConfig(tokenizer=str(tmp_path))).eos_token_id == 258


def _tiny_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_build_tokenizer_falls_back_to_eos_for_padding(tmp_path: Path) -> None:
    _tiny_tokenizer(eos_token="<|end|>").save_pretrained(tmp_path)
    tok = build_tokenizer(ModelConfig(tokenizer=str(tmp_path)))
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|end|>"
    assert tok.pad_token_id == tok.eos_token_id is not None


def test_build_tokenizer_adds_an_eos_when_there_is_none(tmp_path: Path) -> None:
    _tiny_tokenizer().save_pretrained(tmp_path)
    tok = build_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"
    assert tok.eos_token_id == len(tok) - 1 == 256
    assert tok.decode(tok("a</s>", add_special_tokens=False)["input_ids"][-1:]) == "</s>"


def test_build_tokenizer_byte() -> None:
    assert len(build_tokenizer(ModelConfig(tokenizer="byte"))) == 259


def test_resolve_chat_template(tok: PreTrainedTokenizerFast) -> None:
    assert resolve_chat_template(None, tok) == CHATML  # the byte tokenizer has no template
    assert resolve_chat_template("chatml", tok) == CHATML
    assert resolve_chat_template("{{ messages }}", tok) == "{{ messages }}"
    own = byte_tokenizer()
    own.chat_template = "{{ 'x' }}"
    assert resolve_chat_template(None, own) is None  # None: transformers uses the tokenizer's own


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi\nthere 🎉"},
]


def test_chatml_render_and_reply_spans(tok: PreTrainedTokenizerFast) -> None:
    full, spans = ChatRenderer(tok, CHATML).spans(CONVERSATION)
    assert full == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
                    "<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
                    "<|im_start|>assistant\nhi\nthere 🎉<|im_end|>\n")
    assert [full[a:b] for a, b in spans] == ["hi<|im_end|>", "hi\nthere 🎉<|im_end|>"]


def test_chatml_with_tools_puts_them_in_the_system_turn(tok: PreTrainedTokenizerFast) -> None:
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    full, spans = ChatRenderer(tok, CHATML).spans(CONVERSATION[:3], tools)
    assert full.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '{"name": "add"' in full and full.count("<|im_start|>system") == 1
    assert [full[a:b] for a, b in spans] == ["hi<|im_end|>"]


def test_template_that_is_not_prefix_stable_falls_back_to_search(tok: PreTrainedTokenizerFast) -> None:
    """The turn count at the top changes every prefix render: the reply is found by search, and the
    end-of-turn marker probed from the template is included."""
    template = ("[{{ messages | length }}]{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "</{{ m['role'] }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    renderer = ChatRenderer(tok, template)
    assert renderer.marker == "</assistant>"
    full, spans = renderer.spans(CONVERSATION)
    assert [full[a:b] for a, b in spans] == ["hi</assistant>", "hi\nthere 🎉</assistant>"]
    # the second "hi" must not be matched inside the earlier turns
    assert spans[1][0] > full.index("hi</assistant>")
