"""Writes the small datasets the tests use, so the suite needs nothing beside the repository.

    python tests/data/generate.py       # rewrites alpaca_tasks.json, sharegpt_tools.json, docs.jsonl,
                                        # preference_pairs.json, and recipes/examples/data/chat_facts.json and
                                        # preference_facts.json (the chat and DPO examples' data)

Everything is generated here from fixed seeds (no third-party text, no license to inherit), in the formats users
train on: Alpaca rows (instruction / input / output, some with an empty input), ShareGPT conversations with
function calls, observations and a JSON-string `tools` field, and JSON-lines documents with a `text` field. The
instruction tasks have real structure (reversing, counting, arithmetic, sorting, spelling out numbers), so a
small model's loss falls on them. `shakespeare.txt` beside this script is the start of the works of Shakespeare
(public domain), for plain-text pretraining tests.

The chat example (recipes/examples/chat-qlora-local.yaml) fine-tunes the quickstart's 0.8M-parameter model for a few
CPU minutes: what it can learn in that time is a small set of facts, each answered by one word keyed on the last word
of the question (40 of them, capitals and opposites, 10 rows each); its arithmetic came out as well-formed answers
with wrong sums, so the example asks what it can learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE_DATA = HERE.parents[1] / "recipes" / "examples" / "data"
WORDS = ("river", "lantern", "orchard", "copper", "meadow", "thunder", "violet", "harbor", "pebble", "garden", "falcon",
         "winter", "ember", "canvas", "marble", "compass", "willow", "saddle", "beacon", "velvet", "quartz", "tundra")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def spelled(n: int) -> str:
    """0..999 in English words."""
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + spelled(rest))


def alpaca_row(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(6)
    words = rng.sample(WORDS, rng.randint(2, 6))
    a, b = rng.randint(2, 499), rng.randint(2, 499)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": words[0], "output": words[0][::-1]}
    if kind == 1:
        return {"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
                "output": ", ".join(sorted(words))}
    if kind == 2:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 3:
        return {"instruction": "Write the number in words.", "input": str(a), "output": spelled(a)}
    if kind == 4:
        text = " ".join(words)
        return {"instruction": "Count the words in the text and name the longest one.", "input": text,
                "output": f"The text has {len(words)} words; the longest is \"{max(words, key=len)}\"."}
    return {"instruction": f"List the first {len(words)} multiples of {a % 12 + 2}.", "input": "",
            "output": ", ".join(str((a % 12 + 2) * k) for k in range(1, len(words) + 1))}


TOOLS = [
    {"name": "convert_length", "description": "Convert a length between units",
     "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                     "to_unit": {"type": "string"}},
                    "required": ["value", "from_unit", "to_unit"]}},
    {"name": "word_info", "description": "Letters and vowels of a word",
     "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}},
]


def tool_chat(rng: random.Random) -> dict[str, object]:
    """A conversation: a greeting exchange, then either a tool call with its observation, or a plain answer."""
    word = rng.choice(WORDS)
    turns = [{"from": "human", "value": f"Hello! Can you help me with the word \"{word}\"?"},
             {"from": "gpt", "value": f"Of course. What would you like to know about \"{word}\"?"}]
    if rng.random() < 0.6:
        vowels = sum(c in "aeiou" for c in word)
        turns += [{"from": "human", "value": "How many letters and vowels does it have?"},
                  {"from": "function_call", "value": json.dumps({"name": "word_info", "arguments": {"word": word}})},
                  {"from": "observation", "value": json.dumps({"letters": len(word), "vowels": vowels})},
                  {"from": "gpt", "value": f"\"{word}\" has {len(word)} letters, {vowels} of them vowels."}]
        tools = json.dumps(TOOLS)
    else:
        turns += [{"from": "human", "value": "Please spell it backwards."},
                  {"from": "gpt", "value": f"Backwards it is \"{word[::-1]}\"."}]
        tools = rng.choice([json.dumps(TOOLS[:1]), "[]"])
    return {"conversations": turns, "tools": tools}


def documents(text: str, count: int) -> list[dict[str, object]]:
    """JSON-lines documents made of consecutive paragraphs of the text, with an extra field."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    per = max(1, len(paragraphs) // count)
    return [{"text": "\n\n".join(paragraphs[i * per:(i + 1) * per]), "id": i} for i in range(count)]


CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Peru": "Lima", "Canada": "Ottawa", "Kenya": "Nairobi", "Norway": "Oslo",
            "Greece": "Athens", "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Austria": "Vienna",
            "Portugal": "Lisbon", "Ireland": "Dublin", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi"}
OPPOSITES = {"hot": "cold", "up": "down", "day": "night", "fast": "slow", "big": "small", "light": "dark",
             "early": "late", "open": "closed", "full": "empty", "young": "old", "happy": "sad", "wet": "dry",
             "loud": "quiet", "rich": "poor", "strong": "weak", "hard": "soft", "first": "last", "high": "low",
             "left": "right", "true": "false"}


def chat_facts(rng: random.Random, copies: int = 10) -> list[dict[str, str]]:
    """Alpaca rows asking the capital of a country or the opposite of a word, each fact `copies` times, shuffled."""
    facts = [(f"What is the capital of {country}?", f"{city}.") for country, city in CAPITALS.items()]
    facts += [(f"What is the opposite of {word}?", f"{other.capitalize()}.") for word, other in OPPOSITES.items()]
    rows = [{"instruction": question, "input": "", "output": answer} for question, answer in facts
            for _ in range(copies)]
    rng.shuffle(rows)
    return rows


def preference_facts(rng: random.Random, copies: int = 4) -> list[dict[str, str]]:
    """Preference pairs on the same facts: the prompt, the right answer (chosen) and a wrong one of the same kind
    (rejected: another country's capital, another word's opposite), `copies` pairs per fact, shuffled."""
    kinds = [[(f"What is the capital of {country}?", f"{city}.") for country, city in CAPITALS.items()],
             [(f"What is the opposite of {word}?", f"{other.capitalize()}.") for word, other in OPPOSITES.items()]]
    rows = []
    for facts in kinds:
        answers = [answer for _, answer in facts]
        for question, answer in facts:
            wrong = rng.sample([a for a in answers if a != answer], copies)
            rows += [{"prompt": question, "chosen": answer, "rejected": w} for w in wrong]
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(20261130)
    alpaca = [alpaca_row(rng) for _ in range(240)]
    (HERE / "alpaca_tasks.json").write_text(json.dumps(alpaca, indent=1) + "\n", encoding="utf-8")
    chats = [tool_chat(rng) for _ in range(60)]
    (HERE / "sharegpt_tools.json").write_text(json.dumps(chats, indent=1) + "\n", encoding="utf-8")
    docs = documents((HERE / "shakespeare.txt").read_text(encoding="utf-8")[:120_000], 80)
    (HERE / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    facts = chat_facts(random.Random(20261205))
    (EXAMPLE_DATA / "chat_facts.json").write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    pairs = preference_facts(random.Random(20261205))
    (EXAMPLE_DATA / "preference_facts.json").write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
    (HERE / "preference_pairs.json").write_text(json.dumps(preference_facts(random.Random(1), copies=2), indent=1)
                                                + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
