"""Reading a recipe: a YAML file plus `dotted.key=value` overrides -> a typed `Recipe` (trainer/recipe/schema.py), with
every problem collected as a `Problem` naming the key, the value, where it came from and what to do.

Nothing here looks at the world size, the environment or a model: resolve.py does that, after this. A recipe
is read defensively: it must be UTF-8, at most MAX_RECIPE_BYTES, use at most MAX_ALIASES YAML aliases, and its
aliases may add at most MAX_ALIAS_EXPANSION values to what it writes out, counted on the document's graph before
anything is built (a "billion laughs" recipe, even one with a few dozen aliases nested under model.config, would
otherwise expand to gigabytes once validated, dumped or printed). Overrides are read by the same rules.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError

from trainer.errors import CheckpointError, Problem, show_value
from trainer.paths import shipped_recipes
from trainer.recipe.schema import Recipe, Section, field_at

MAX_RECIPE_BYTES = 4 * 2**20
MAX_ALIASES = 100
MAX_ALIAS_EXPANSION = 10_000  # values the aliases may add to those the text writes out
COMMAND_LINE = "command line"
RECIPE_FILE = "recipe"
DEFAULT = "default"


def _related(key: str, keys: frozenset[str]) -> bool:
    """A key given at, above or below `key`."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys)


@dataclass(frozen=True)
class Sources:
    """Where each value came from: the command line (an override at, above or below the key), the recipe file,
    or the schema's default."""

    overridden: frozenset[str] = field(default_factory=frozenset)
    in_file: frozenset[str] | None = None  # dotted keys the file gives; None: unknown, say "recipe"

    def __call__(self, key: str) -> str:
        if _related(key, self.overridden):
            return COMMAND_LINE
        if self.in_file is None or any(k == key or k.startswith(key + ".") for k in self.in_file):
            return RECIPE_FILE
        return DEFAULT


def dotted_keys(raw: dict[str, Any], prefix: str = "") -> frozenset[str]:
    """Every dotted key of a nested mapping, sections included."""
    keys: set[str] = set()
    for k, v in raw.items():
        key = f"{prefix}{k}"
        keys.add(key)
        if isinstance(v, dict):
            keys |= dotted_keys(v, key + ".")
    return frozenset(keys)


# ---------------------------------------------------------------------------------------------- reading

def _file_problem(path: str | Path, message: str, source: str = RECIPE_FILE) -> list[Problem]:
    return [Problem("recipe", str(path), message, source)]


def _missing_recipe_hint(path: Path) -> str:
    """What a recipe path that does not exist probably meant: a shipped recipe named without its path
    (`quickstart`), a file of the same folder spelled differently, or else an example of a path."""
    shipped = shipped_recipes()
    name = path.as_posix().removesuffix(".yaml").removeprefix("recipes/")
    by_stem = {p.stem: rel for rel, p in shipped.items()}
    match = name if name in shipped else by_stem.get(name)
    if match is not None:
        return (f"'{match}' is a shipped recipe: give its path, recipes/{match}.yaml in a clone, or copy it here "
                f"with `python -m trainer recipes copy {match} .`")
    folder = path.parent if path.parent.is_dir() else None
    near = [f.name for f in folder.glob("*.y*ml")] if folder else []
    close = difflib.get_close_matches(path.name, near, n=1, cutoff=0.6)
    if close:
        return f"did you mean {path.parent / close[0]}?"
    close = difflib.get_close_matches(name, list(shipped), n=1, cutoff=0.6)
    if close:
        return f"did you mean the shipped recipe {close[0]} (recipes/{close[0]}.yaml)?"
    return "give the path of a YAML recipe (e.g. recipes/quickstart.yaml); `python -m trainer recipes` lists the " \
           "shipped ones"


def read_text(path: str | Path) -> tuple[str, list[Problem]]:
    """The recipe file's text, or the reason it cannot be read (missing, a directory, unreadable, too big, not
    UTF-8)."""
    p = Path(path)
    if not p.exists():
        return "", _file_problem(path, f"file not found; {_missing_recipe_hint(p)}", COMMAND_LINE)
    if p.is_dir():
        return "", _file_problem(path, "is a directory; give the path of a YAML recipe file", COMMAND_LINE)
    try:
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:
            return "", _file_problem(path, f"is {size / 2**20:.1f} MiB; a recipe is a few kB of YAML (limit "
                                     f"{MAX_RECIPE_BYTES // 2**20} MiB): is this the right file?")
        raw = p.read_bytes()
    except OSError as e:
        return "", _file_problem(path, f"cannot be read ({e.strerror or e}); check its permissions")
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return "", _file_problem(path, f"is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
                                 "UTF-8")


class UnsafeYaml(ValueError):
    """YAML that would take far more memory or time to build than its text suggests; str() says why."""


def _alias_count(text: str) -> int:
    """YAML aliases (`*name`) in the text, counted from the event stream (no document is built)."""
    return sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_values(root: yaml.Node) -> tuple[int, int]:
    """(values the text writes out, values once every alias is expanded), counted on the composed graph, where
    an alias is one more reference to its anchor's node. UnsafeYaml when an alias sits inside its own anchor."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose subtree is being counted: the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
        elif id(node) in open_nodes:
            raise UnsafeYaml("a YAML alias refers to a value that contains it (an endless value): write it out")
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return len(sizes), sizes[id(root)]


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing (UnsafeYaml) what would expand far beyond its text: more than MAX_ALIASES
    aliases, or aliases that add more than MAX_ALIAS_EXPANSION values, wherever they are in the document."""
    aliases = _alias_count(text)
    if aliases > MAX_ALIASES:
        raise UnsafeYaml(f"uses {aliases} YAML aliases (limit {MAX_ALIASES}); expanding them could take "
                         "gigabytes: write the values out")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        written, expanded = _expanded_values(node)
        if expanded - written > MAX_ALIAS_EXPANSION:
            raise UnsafeYaml(f"its YAML aliases expand the {written:,} values written to {show_number(expanded)} "
                             f"(at most {MAX_ALIAS_EXPANSION:,} more): write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise UnsafeYaml("nested too deeply to be a recipe") from None
    except ValueError as e:  # int() of a number with more digits than Python converts (4300)
        if isinstance(e, UnsafeYaml):
            raise
        raise UnsafeYaml(f"holds a number too long to read ({str(e).split(';')[0]}): no setting takes one") from None
    finally:
        loader.dispose()


def show_number(n: int) -> str:
    """A count as a message shows it: 1,234,567, or 3.9e+09 values when it has more digits than that."""
    return f"{n:,}" if n < 10**9 else f"{float(n):.1e}" if n < 10**300 else f"about 10^{len(str(n)) - 1}"


def parse_yaml(text: str, path: str | Path) -> tuple[dict[str, Any], list[Problem]]:
    """The recipe's mapping of sections, or why the text is not one."""
    try:
        data = load_yaml(text)
    except UnsafeYaml as e:
        return {}, _file_problem(path, str(e))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return {}, _file_problem(path, f"not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, _file_problem(path, "the top level must be a mapping of sections (output_dir:, model:, ...)")
    return data, []


def read_yaml(path: str | Path) -> tuple[dict[str, Any], list[Problem]]:
    text, problems = read_text(path)
    return (({}, problems) if problems else parse_yaml(text, path))


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """`a.b=value` strings to {dotted key: YAML value}."""
    parsed: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(item, None, "an override must look like section.key=value (e.g. "
                                    "train.max_steps=50)", COMMAND_LINE))
            continue
        try:
            parsed[key] = load_yaml(raw) if raw.strip() else ""
        except UnsafeYaml as e:
            problems.append(Problem(key, raw, f"{e}", COMMAND_LINE))
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed, problems


def _takes_null(key: str) -> bool:
    """Whether the schema's key accepts null (unknown keys are left for typing to report)."""
    info = field_at(key)
    return info is None or type(None) in typing.get_args(info.annotation)


def apply_overrides(raw: dict[str, Any], parsed: dict[str, Any]) -> list[Problem]:
    """Set each dotted key in `raw` (in place), creating sections as needed. `key=null` on a key that takes no null
    clears it: the schema's default applies."""
    problems = []
    for key, value in parsed.items():
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(key, value, f"'{'.'.join(parts[:i + 1])}' is not a section", COMMAND_LINE))
                break
            node = child
        else:
            if value is None and not _takes_null(key):
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
    return problems


# ---------------------------------------------------------------------------------------------- typing

def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """A did-you-mean hint for a typo, or the list of valid names when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys here: {', '.join(sorted(choices))}"


# Other spellings of a choice that users bring from torch and other tools, and the choice they mean.
VALUE_ALIASES = {"float16": "fp16", "half": "fp16", "torch.float16": "fp16", "bfloat16": "bf16",
                 "torch.bfloat16": "bf16", "float32": "fp32", "float": "fp32", "torch.float32": "fp32", "adam": "adamw",
                 "ddp": "native"}


def did_you_mean_value(value: str, choices: list[str]) -> str:
    """A did-you-mean hint for a value outside its choices: a known other spelling (float16 for fp16), a choice
    spelled differently in case or close to it, or "" when nothing fits."""
    lowered = value.strip().lower()
    aliased = VALUE_ALIASES.get(lowered, lowered)
    if aliased in choices:
        return f"did you mean '{aliased}'?"
    close = difflib.get_close_matches(lowered, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def type_name(tp: Any) -> str:
    """How a message names a type: 'an integer', 'fp32 | bf16 | fp16', 'a list of string or null'."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_plural(type_name(arg))}"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a section (a mapping of keys)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _plural(name: str) -> str:
    """'an integer' -> 'integers', 'a string' -> 'strings' (other names stay as they are)."""
    for article in ("an ", "a "):
        if name.startswith(article) and " " not in name[len(article):]:
            return name[len(article):] + "s"
    return name


def _locate(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, Any, bool]:
    """(path of schema keys the error is at, the section holding the last key, that key's annotation, whether the
    last part of the path is a key the schema does not have)."""
    cls: type[BaseModel] | None = Recipe
    path: list[str] = []
    annotation: Any = Recipe
    for part in loc:
        if not isinstance(part, str) or cls is None:
            break  # a list index or a union member's tag: the error belongs to the field reached so far
        if part not in cls.model_fields:
            return path + [part], cls, None, True
        path.append(part)
        annotation = cls.model_fields[part].annotation
        holder, cls = cls, annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
        if cls is None:
            return path, holder, annotation, False
    return path, None, annotation, False


def _value_at(raw: dict[str, Any], path: list[str]) -> Any:
    node: Any = raw
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _message(error: Any, holder: type[BaseModel] | None, annotation: Any, unknown: bool, path: list[str],
             value: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if unknown:
        names = list(holder.model_fields) if holder else []
        prefix = ".".join(path[:-1]) + "." if len(path) > 1 else ""
        return f"unknown key; {did_you_mean(path[-1], names, prefix)}"
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit:,}" if isinstance(limit, int) else f"must be {bounds[kind]} {limit}"
    if kind == "finite_number" or (kind == "float_type" and isinstance(value, int) and not isinstance(value, bool)):
        return "must be a finite number (not inf or nan; at most about 1.8e308)"
    if kind == "literal_error" and isinstance(value, (str, int)):
        choices = [str(c) for c in typing.get_args(_literal_of(annotation))]
        hint = did_you_mean_value(str(value), choices) if isinstance(value, str) else ""
        text = f"must be one of: {', '.join(choices)}"
        return f"{text}; {hint}" if hint.startswith("did") else text
    if kind in ("model_type", "model_attributes_type", "dict_type") and isinstance(annotation, type) \
            and issubclass(annotation, BaseModel):
        return f"must be a section (a mapping of keys), not {type(value).__name__}"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    index = next((part for part in error["loc"][len(path):] if isinstance(part, int)), None)
    if index is not None and isinstance(value, list) and index < len(value):
        return f"must be {type_name(annotation)}; item {index} is {show_value(value[index])} " \
               f"({type(value[index]).__name__})"
    return f"must be {type_name(annotation)}, got {type(value).__name__}"


def _literal_of(annotation: Any) -> Any:
    """The Literal inside an annotation (`Literal[...] | None` included)."""
    if typing.get_origin(annotation) is Literal:
        return annotation
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return arg
    return annotation


def _remove(raw: dict[str, Any], path: list[str]) -> None:
    node: Any = raw
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def to_recipe(raw: dict[str, Any], sources: Sources = Sources()) -> tuple[Recipe, list[Problem]]:
    """The typed recipe and every type problem, one per key. A key with a problem falls back to its default, so
    the recipe returned can still be cross-checked (resolve.py skips rules on keys already reported)."""
    data = copy.deepcopy(raw)
    problems: list[Problem] = []
    for _ in range(50):  # each round removes at least one bad key
        try:
            return Recipe.model_validate(data), problems
        except ValidationError as e:
            errors = e.errors()
        seen: set[str] = set()
        for error in errors:
            path, holder, annotation, unknown = _locate(error["loc"])
            key = ".".join(path)
            if key in seen or not path:
                continue
            seen.add(key)
            value = _value_at(data, path)
            problems.append(Problem(key, value, _message(error, holder, annotation, unknown, path, value),
                                    sources(key)))
            _remove(data, path)
    raise AssertionError("a recipe whose problems could not be isolated")  # each round removes a key: unreachable


def load_recipe(path: str | Path | None, overrides: list[str] | None = None
                ) -> tuple[Recipe, Sources, list[Problem]]:
    """The recipe file with its overrides applied and typed; problems listed, not raised (resolve.py raises them
    together with its own)."""
    raw, problems = read_yaml(path) if path is not None else ({}, [])
    if problems:  # the file itself is the problem: checking the defaults would only add noise
        return Recipe(), Sources(), problems
    in_file = dotted_keys(raw)
    parsed, problems = parse_overrides(overrides or [])
    problems += apply_overrides(raw, parsed)
    sources = Sources(frozenset(parsed), in_file)
    recipe, typed = to_recipe(raw, sources)
    return recipe, sources, problems + typed


def with_overrides(recipe: Recipe, overrides: list[str]) -> tuple[Recipe, list[Problem]]:
    """`recipe` with dotted overrides applied (what a memory-plan suggestion proposes), and any type problems."""
    raw = recipe.model_dump()
    parsed, problems = parse_overrides(overrides)
    problems += apply_overrides(raw, parsed)
    new, typed = to_recipe(raw, Sources(frozenset(parsed)))
    return new, problems + typed


def to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML, every key written out (output_dir/config.yaml, checkpoints, `validate`)."""
    return yaml.safe_dump(recipe.model_dump(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def saved_recipe(path: Path) -> Recipe:
    """The recipe a checkpoint was saved under (its config.yaml); CheckpointError when it no longer reads."""
    data, problems = read_yaml(path)
    recipe, typed = to_recipe(data) if not problems else (Recipe(), [])
    problems += typed
    if problems:
        raise CheckpointError(f"{path}: the saved recipe cannot be read by this version: "
                              + "; ".join(p.render() for p in problems[:3]))
    return recipe
