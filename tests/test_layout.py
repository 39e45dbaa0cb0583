"""The layout's rules, checked: seven stage entry points, a library that imports no stage, no stage that
imports another, dvc.yaml's code deps equal to what each stage really imports, one source of defaults
and short functions."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import yaml

from cnnlens.config import Params, to_dict

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "finetune", "evaluate", "saliency", "activations", "export")
# dvc.yaml stage name -> its entry point module
ENTRY = {
    "download_data": "download",
    "download_weights": "download",
    "prepare": "prepare",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "saliency": "saliency",
    "activations": "activations",
    "export": "export",
}
MAX_FUNCTION_LINES = 50  # body lines, the docstring not counted


def imported_modules(path: Path) -> set[str]:
    """Every project module that `path` imports, at the top or inside a function (both run)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from cnnlens import x`
    return {m for m in found if (ROOT / (m.replace(".", "/") + ".py")).is_file()}


def code_deps(module: str) -> set[str]:
    """The .py files a module's run reads: itself and its project imports, transitively.

    config.py reads the registries (losses, model, attribution, hooks) through importlib when it
    validates a choice; those are not followed here on purpose: they decide whether a value is
    allowed, not what a stage computes, so a new saliency method must not rerun download."""
    todo, seen = [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += imported_modules(ROOT / (m.replace(".", "/") + ".py"))
    return {m.replace(".", "/") + ".py" for m in seen}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_stages_folder_holds_the_seven_entry_points_only():
    assert sorted(p.stem for p in (ROOT / "stages").glob("*.py")) == sorted((*STAGES, "__init__"))


def test_no_stage_imports_a_stage_and_the_library_imports_none():
    for path in [*(ROOT / "stages").glob("*.py"), *(ROOT / "cnnlens").glob("*.py")]:
        bad = sorted(m for m in imported_modules(path) if m.startswith("stages"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_dvc_yaml_code_deps_are_exactly_what_each_stage_imports():
    for name, stage in dvc_stages().items():
        declared = {d for d in stage["deps"] if d.endswith(".py")}
        needed = code_deps(f"stages.{ENTRY[name]}")
        assert declared == needed, (
            f"dvc.yaml stage {name}: missing {sorted(needed - declared)}, "
            f"not needed {sorted(declared - needed)}"
        )


def test_params_yaml_equals_the_dataclass_defaults():
    """One source of defaults: the dataclasses in cnnlens/config.py; params.yaml must say the same."""
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert written == to_dict(Params()), "params.yaml and cnnlens/config.py defaults disagree"
    assert dataclasses.is_dataclass(Params)


def test_functions_are_short():
    long = []
    for path in [*(ROOT / "stages").glob("*.py"), *(ROOT / "cnnlens").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def import_graph() -> dict[str, list[str]]:
    """{library module: the library modules it imports}, every import (top-level or in a function)."""
    modules = {f"cnnlens.{p.stem}" for p in (ROOT / "cnnlens").glob("*.py") if p.stem != "__init__"}
    return {
        m: sorted(d for d in imported_modules(ROOT / (m.replace(".", "/") + ".py")) if d in modules)
        for m in sorted(modules)
    }


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in cnnlens/: " + " -> ".join(cycle)


def test_stage_entry_points_are_thin():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "stages").glob("*.py")}
    long = {name: n for name, n in sizes.items() if n > 150}
    assert not long, f"stage files over 150 lines (move the work into cnnlens/): {long}"


def test_functions_take_at_most_three_positional_parameters():
    """torchvision's style: after the first few, arguments are keyword-only, so a call reads as it means."""
    wide = []
    for path in [*(ROOT / "stages").glob("*.py"), *(ROOT / "cnnlens").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [
                    a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")
                ]
                if len(positional) > 3:
                    wide.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(positional)})"
                    )
    assert not wide, "more than three positional parameters (make the rest keyword-only): " + "; ".join(wide)
