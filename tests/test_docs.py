"""Every reference in the documentation, and in the code's comments and docstrings, exists.

Scanned: README.md, BENCHMARKS.md and docs/*.md (all of their text), the comments and docstrings of
the Python files in cnnlens/, stages/, bench/ and tests/, and the comments of the shell scripts,
Makefile, dvc.yaml and params.yaml. One test per scanned file. Checked:

- repository paths: a path whose first folder is a tracked top-level folder (`bench/gpu_check.sh`),
  globs included (`stages/*.py`); `file.py::name` also needs a top-level def or class `name` there;
- code references: a dotted name whose first part is a module of cnnlens/ or stages/
  (`quality.deletion_insertion`, `cnnlens.files.atomic_outputs`, `errors.StageError.exit_code`),
  resolved by parsing that module with `ast` (nothing is imported); a name that is also a
  params.yaml key (`model.arch`, `saliency.methods`) resolves there;
- markdown links: relative links (files, folders, `#anchors` as GitHub makes them from headings);
- section references in prose: `BENCHMARKS.md, ## GPU` or `README ## Tests`.

Skipped: URLs, generated paths (they do not exist in a clean checkout) and `<placeholders>`.
Also: the README's `dvc dag --mermaid` block draws the DAG that dvc.yaml's deps and outs make.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# written by runs, not by git: a reference into them cannot be checked in a clean checkout
GENERATED = {"demo", "build", "data", "models", "metrics", "plots", "dvc_plots", ".venv", ".dvc"}
# a dotted word ending in one of these is a file name (`model.pt`, `metrics.json`), not code
FILE_SUFFIXES = {
    *"py sh md json csv tsv png jpg jpeg gif bmp webp tiff yaml yml toml txt ini lock".split(),
    *"pt pth npz u8 html zip gz tar log dir cfg onnx".split(),
}
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
DOTTED = re.compile(r"(?<![\w./-])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./-])([\w.-]+/[\w.*/-]*[\w*])(?:::(\w+))?")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
SECTION = re.compile(r"\b((?:[\w./-]+/)?[\w-]+\.md|README|BENCHMARKS)[\s,:;`(]*##\s+([^`)\n]*\w)")


@cache
def top_folders() -> frozenset[str]:
    """Tracked top-level folders (git ls-files; a copy without .git: every folder not generated)."""
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        names = {f.split("/")[0] for f in files if "/" in f}
    except (OSError, subprocess.CalledProcessError):
        names = {p.name for p in ROOT.iterdir() if p.is_dir()}
    return frozenset(names | {"docs"}) - GENERATED - {".git"}


@cache
def modules() -> dict[str, Path]:
    """Project module name -> file: `quality`, `cnnlens.quality`, `stages.finetune`, `cnnlens`."""
    found = {}
    for package in ("cnnlens", "stages"):
        found[package] = ROOT / package / "__init__.py"
        for path in (ROOT / package).glob("*.py"):
            if path.stem != "__init__":
                found[path.stem] = found[f"{package}.{path.stem}"] = path
    return found


@cache
def top_level_names(path: Path) -> dict[str, set[str] | None]:
    """Top-level defs, classes and assignments of a module -> the names inside (classes) or None."""
    names: dict[str, set[str] | None] = {}
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.If, ast.Try)):  # names bound under `if TYPE_CHECKING` / `try`
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {n for member in node.body for n in bound_names(member)}
        else:
            names.update(dict.fromkeys(bound_names(node)))
    return names


def bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


@cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def is_params_key(parts: list[str]) -> bool:
    node = params()
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_dotted(name: str, local: frozenset[str] = frozenset()) -> str | None:
    """Why `name` does not resolve, or None. Not project code, so not checked: a file name, a params
    key, a variable of the function the text is in (an attribute of a parameter named `model`) and
    a placeholder (`stages.X`: a single capital letter)."""
    parts = name.split(".")
    if parts[-1] in FILE_SUFFIXES or parts[0] not in modules() or parts[0] in local:
        return None
    if is_params_key(parts) or any(re.fullmatch("[A-Z]", p) for p in parts):
        return None
    if parts[0] in ("cnnlens", "stages"):
        if f"{parts[0]}.{parts[1]}" in modules():
            parts = [f"{parts[0]}.{parts[1]}", *parts[2:]]
        if len(parts) == 1:
            return None
    path = modules()[parts[0]]
    names = top_level_names(path)
    if len(parts) >= 2 and parts[1] not in names:
        return f"no top-level {parts[1]} in {path.relative_to(ROOT)}"
    if len(parts) >= 3 and names[parts[1]] is not None and parts[2] not in names[parts[1]]:
        return f"class {parts[1]} in {path.relative_to(ROOT)} has no {parts[2]}"
    return None


def check_path(path: str, member: str | None) -> str | None:
    """Why a repository path does not exist, or None; paths outside the tracked folders are skipped."""
    path = path.rstrip(".")
    if path.split("/")[0] not in top_folders():
        return None
    matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
    if not matches:
        return "no such file or folder"
    if member and matches[0].suffix == ".py" and member not in top_level_names(matches[0]):
        return f"no top-level {member} in {path}"
    return None


@cache
def anchors(md: Path) -> frozenset[str]:
    """The #anchors GitHub makes from a markdown file's headings (code blocks skipped)."""
    seen: dict[str, int] = {}
    for line in strip_code_blocks(md.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return frozenset(seen)


def strip_code_blocks(text: str) -> str:
    """Fenced code blocks blanked line for line (line numbers stay), so a `# comment` is no heading."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)


def check_link(source: Path, target: str) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
        return None
    file, _, anchor = target.partition("#")
    dest = (source.parent / file).resolve() if file else source
    if not dest.exists():
        return "no such file or folder"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading for #{anchor} in {dest.relative_to(ROOT)}"
    return None


def check_section(source: Path, md: str, heading: str) -> str | None:
    md = md if md.endswith(".md") else md + ".md"
    dest = ROOT / md if (ROOT / md).exists() else source.parent / md
    if not dest.exists():
        return f"no such file {md}"
    texts = [re.sub(r"^#+\s*", "", h) for h in strip_code_blocks(dest.read_text()).splitlines()]
    if not any(heading == t or heading.startswith(t + " ") for t in texts if t):
        return f"no heading '## {heading}' in {md}"
    return None


def problems_in(source: Path, lineno: int, text: str, local: frozenset[str] = frozenset()) -> list[str]:
    """Every broken reference in one piece of text, as `file:line: reference: why`; `local`: the
    names the function around the text binds."""
    text = URL.sub(" ", text)
    found = []
    for m in DOTTED.finditer(text):
        found.append((m.group(0), check_dotted(m.group(0), local), m.start()))
    for m in PATH.finditer(text):
        found.append((m.group(0), check_path(m.group(1), m.group(2)), m.start()))
    for m in SECTION.finditer(text):
        found.append((m.group(0), check_section(source, m.group(1), m.group(2)), m.start()))
    if source.suffix == ".md":
        for m in LINK.finditer(text):
            found.append((f"({m.group(1)})", check_link(source, m.group(1)), m.start()))
    where = source.relative_to(ROOT)
    return [
        f"{where}:{lineno + text.count(chr(10), 0, start)}: {ref}: {why}" for ref, why, start in found if why
    ]


def local_names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> frozenset[str]:
    """The parameters and variables a function binds."""
    args = func.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    stored = {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return frozenset({a.arg for a in params if a} | stored)


def python_texts(path: Path) -> list[tuple[int, str, frozenset[str]]]:
    """(line, text, names bound by the innermost function around it) of every comment and docstring."""
    source = path.read_text()
    tree = ast.parse(source)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def around(line: int) -> frozenset[str]:
        inside = [f for f in funcs if f.lineno <= line <= f.end_lineno]
        return local_names(max(inside, key=lambda f: f.lineno)) if inside else frozenset()

    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    texts = [(t.start[0], t.string, around(t.start[0])) for t in tokens if t.type == tokenize.COMMENT]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    texts.append((first.lineno, first.value.value, around(first.lineno)))
    return texts


def hash_comments(path: Path) -> list[tuple[int, str, frozenset[str]]]:
    """(line, text) of every `#` comment of a shell script, Makefile or YAML file (strings aside)."""
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(?:^|\s)#(?!!)(.*)", line)
        if m and line.count('"', 0, m.start()) % 2 == 0 and line.count("'", 0, m.start()) % 2 == 0:
            texts.append((n, m.group(1), frozenset()))
    return texts


def scanned() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    code = [p for d in ("cnnlens", "stages", "bench", "tests") for p in sorted((ROOT / d).glob("*.py"))]
    other = [ROOT / "Makefile", ROOT / "dvc.yaml", ROOT / "params.yaml", ROOT / ".ci" / "run"]
    shell = [*sorted((ROOT / "bench").glob("*.sh")), *sorted((ROOT / "scripts").glob("*.sh"))]
    return [p for p in (*docs, *code, *other, *shell) if p.exists()]


def broken_references(path: Path) -> list[str]:
    if path.suffix == ".md":
        return problems_in(path, 1, path.read_text())
    texts = python_texts(path) if path.suffix == ".py" else hash_comments(path)
    return [p for line, text, local in texts for p in problems_in(path, line, text, local)]


@pytest.mark.parametrize("path", scanned(), ids=lambda p: str(p.relative_to(ROOT)))
def test_references_exist(path):
    broken = broken_references(path)
    assert not broken, f"{len(broken)} broken reference(s):\n" + "\n".join(broken)


def dvc_yaml_edges() -> set[tuple[str, str]]:
    """(upstream, downstream) for every stage that depends on another stage's out, as `dvc dag` draws."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {
        name: [
            o if isinstance(o, str) else next(iter(o)) for o in [*s.get("outs", []), *s.get("metrics", [])]
        ]
        for name, s in stages.items()
    }
    return {
        (up, name)
        for name, stage in stages.items()
        for dep in stage.get("deps", [])
        for up, paths in outs.items()
        if any(dep == p or dep.startswith(p + "/") or p.startswith(dep + "/") for p in paths)
    }


def test_readme_dag_is_dvc_yamls_dag():
    block = re.search(r"```mermaid\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no mermaid block (the output of `dvc dag --mermaid`)"
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', block.group(1)))
    drawn = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", block.group(1))}
    assert drawn == dvc_yaml_edges(), "README's DAG differs from dvc.yaml: paste `dvc dag --mermaid` again"


def test_the_checks_find_what_they_should():
    """The checker itself: each kind of reference, a good one and a broken one."""
    assert check_dotted("cnnlens.files.atomic_outputs") is None
    assert check_dotted("quality.deletion_insertion") is None
    assert check_dotted("errors.StageError.exit_code") is None
    assert check_dotted("model.arch") is None  # a params key
    assert check_dotted("torch.load") is None and check_dotted("model.pt") is None  # not project code
    assert check_dotted("tensors.no_such_function")
    assert check_dotted("errors.StageError.no_such_method")
    assert check_dotted("model.layer4") and check_dotted("model.layer4", frozenset({"model"})) is None
    assert check_dotted("stages.X") is None  # a placeholder
    assert check_path("cnnlens/quality.py", None) is None and check_path("stages/*.py", None) is None
    assert check_path("cnnlens/no_such_module.py", None)
    assert check_path("tests/test_docs.py", "test_the_checks_find_what_they_should") is None
    assert check_path("tests/test_docs.py", "no_such_test")
    assert check_path("data/prepared/shards/index.json", None) is None  # generated: skipped
    readme = ROOT / "README.md"
    assert check_link(readme, "BENCHMARKS.md") is None and check_link(readme, "docs/no-such-page.md")
    assert check_link(readme, "#no-such-heading")
    assert anchors(readme) and check_link(readme, "#" + sorted(anchors(readme))[0]) is None
    assert check_section(readme, "BENCHMARKS.md", "GPU") is None
    assert check_section(readme, "BENCHMARKS.md", "No such section")
