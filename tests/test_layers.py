"""The package's layering: no import cycles (also through imports inside functions), and light verbs stay light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import QUICKSTART, ROOT

PACKAGE = ROOT / "trainer"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the trainer modules it imports}, counting every import statement anywhere in the file (module level
    and inside functions). `from trainer.x import y` counts trainer.x, and trainer.x.y when y is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name.startswith("trainer"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first == last), or None: depth-first search with colours."""
    colour = dict.fromkeys(graph, "white")
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == "white" and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = "black"
        return None

    for start in sorted(graph):
        if colour[start] == "white" and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "trainer.recipe.resolve" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# The intended map, lowest room first: a module imports only modules of its own room or of rooms below it. A
# module belongs to the room of the longest prefix that names it; package __init__ files import nothing.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("trainer.errors", "trainer.paths", "trainer.dtypes", "trainer.logs", "trainer.faults",
                "trainer.safeio", "trainer.distributed", "trainer.run_lock", "trainer.model.causal_lm")),
    ("recipe declarations", ("trainer.recipe.schema", "trainer.recipe.read", "trainer.recipe.known_models",
                             "trainer.recipe.architecture", "trainer.recipe.execution", "trainer.recipe.resolved",
                             "trainer.recipe.reference")),
    ("libraries: data, tokenizer, loss, precision, optimizers, adapters, the engine contract",
     ("trainer.data", "trainer.optim", "trainer.adapters", "trainer.model.tokenizer", "trainer.model.loss",
      "trainer.preference",
      "trainer.model.precision", "trainer.model.int8_weights", "trainer.model.activation_offload",
      "trainer.model.inference", "trainer.engine.base", "trainer.engine.nonfinite", "trainer.engine.op_builds",
      "trainer.engine.ds_files")),
    ("the plan's vocabulary and the engines' specs", ("trainer.plan.items", "trainer.plan.shapes",
                                                      "trainer.plan.optimizer_state", "trainer.plan.per_layer",
                                                      "trainer.plan.frozen_base", "trainer.plan.activations",
                                                      "trainer.engine.ds_config", "trainer.engine.native_spec",
                                                      "trainer.engine.deepspeed_spec", "trainer.engine.specs")),
    ("recipe checks and resolution", ("trainer.recipe.rules", "trainer.recipe.resolve")),
    ("the plan", ("trainer.plan",)),
    ("building the model and the engines", ("trainer.model", "trainer.engine", "trainer.data.prepare",
                                            "trainer.data.preview")),
    ("the run", ("trainer.checkpoint", "trainer.run")),
    ("using a trained model", ("trainer.use",)),
    ("the command line", ("trainer.__main__",)),
]


def room_of(module: str) -> int | None:
    """The index in ROOMS of the room a module belongs to (the longest matching prefix)."""
    matches = [(len(prefix), level) for level, (_, prefixes) in enumerate(ROOMS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def packages() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def test_rooms_import_only_rooms_below_them() -> None:
    graph, inits = import_graph(), packages()
    unmapped = sorted(m for m in graph if m not in inits and room_of(m) is None)
    assert not unmapped, f"modules in no room of the map: {unmapped}"
    upward = [f"{m} ({ROOMS[room_of(m)][0]}) imports {d} ({ROOMS[room_of(d)][0]})"  # type: ignore[index]
              for m in sorted(graph) if m not in inits for d in sorted(graph[m] - inits)
              if room_of(d) > room_of(m)]  # type: ignore[operator]
    assert not upward, "imports that run up the map:\n" + "\n".join(upward)


def test_the_room_check_finds_an_upward_import() -> None:
    assert room_of("trainer.run.loop") > room_of("trainer.recipe.schema")  # type: ignore[operator]
    assert room_of("trainer.engine.native_spec") < room_of("trainer.engine.native")  # type: ignore[operator]


def test_low_rooms_do_not_import_the_recipe_machinery() -> None:
    """errors is a leaf; the schema imports only errors; optimizer math and the engines never read recipe files."""
    graph = import_graph()
    assert graph["trainer.errors"] == set()
    assert graph["trainer.recipe.schema"] <= {"trainer.errors"}
    for low in ("trainer.optim.galore", "trainer.optim.sharded", "trainer.model.loss", "trainer.dtypes"):
        assert not graph[low] & {"trainer.recipe.read", "trainer.recipe.resolve", "trainer.recipe.rules"}, low


def test_package_inits_import_nothing_heavy() -> None:
    for init in (PACKAGE / "engine" / "__init__.py", PACKAGE / "__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], init


@pytest.mark.slow  # a fresh interpreter (what it imports, or its memory limit, is checked)
def test_validate_loads_only_what_it_needs() -> None:
    """`validate` on the quickstart (native engine, no adapters) leaves the engines, DeepSpeed, bitsandbytes and
    peft unloaded: it is meant to be quick on a login node (the engines' specs, which import no engine, are read)."""
    code = ("import sys; from trainer.__main__ import main; code = main(['validate', sys.argv[1]]); "
            "heavy = [m for m in ('deepspeed', 'bitsandbytes', 'peft', 'trainer.engine.native', "
            "'trainer.engine.deepspeed', 'trainer.engine.build', 'trainer.run.loop') "
            "if m in sys.modules]; print('LOADED', heavy); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]


# Comparisons that decide which engine runs or what it shards/offloads. Only execution.py derives the execution
# from the recipe's keys; the engines' specs validate the keys a recipe writes. Everything else reads
# `ResolvedRun.execution`.
DERIVATION = re.compile(r'engine\s*[!=]=\s*"(deepspeed|native)"|zero_stage\s*(==|!=|<=|>=|<|>)\s*\d'
                        r'|offload_(optimizer|params)\s*[!=]=\s*"')
DERIVES = {"trainer/recipe/execution.py", "trainer/engine/native_spec.py", "trainer/engine/deepspeed_spec.py"}


def derivations(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if DERIVATION.search(line)]


def test_the_execution_is_derived_in_one_place() -> None:
    assert derivations(PACKAGE / "recipe" / "execution.py"), "the pattern no longer finds the derivation itself"
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(ROOT).as_posix() not in DERIVES
             for hit in derivations(p)]
    assert not found, "read ResolvedRun.execution instead of re-deriving it:\n" + "\n".join(found)


def test_test_modules_share_helpers_through_helpers_py() -> None:
    """A test module imports what tests share from tests/helpers.py (or the probes), never from another test
    module or from conftest.py."""
    tests = ROOT / "tests"
    crossing = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                if node.module.split(".")[1].startswith(("test_", "conftest")):
                    crossing.append(f"{path.name}: from {node.module} import ...")
    assert not crossing, crossing
