"""The package's layers: imports go downward only, never in a cycle, and never hide inside a function.

    foundation   vidpo (the version, the compiled vidpo._C), vidpo.utils, vidpo.parallel
    kernels      vidpo.kernels
    models       vidpo.models
    config       vidpo.config
    data         vidpo.data
    core         vidpo.training, vidpo.objectives, vidpo.labeling, vidpo.evaluation
    stages       vidpo.stages, vidpo.cluster
    ipo          vidpo.ipo
    cli          vidpo.cli, vidpo.__main__

A module may import from its own layer or any layer below it. Inside a function, only optional packages (and
Triton, whose kernels are defined lazily so that TRITON_INTERPRET takes effect) may be imported: an internal
import inside a function is how a cycle hides from import time. Every check runs on a parsed copy of the
source tree, so the tests below also plant each kind of violation in a copy and watch the checker catch it.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_ROOTS = {"vidpo": "engine", "vidpo.kernels": "kernels", "vidpo.models": "models"}
LAYERS = [
    ("foundation", ("vidpo", "vidpo._C", "vidpo.utils", "vidpo.parallel")),
    ("kernels", ("vidpo.kernels",)),
    ("models", ("vidpo.models",)),
    ("config", ("vidpo.config",)),
    ("data", ("vidpo.data",)),
    ("core", ("vidpo.training", "vidpo.objectives", "vidpo.labeling", "vidpo.evaluation")),
    ("stages", ("vidpo.stages", "vidpo.cluster")),
    ("ipo", ("vidpo.ipo",)),
    ("cli", ("vidpo.cli", "vidpo.__main__")),
]
# Packages a module may import inside a function: not installed everywhere (GPU-only, or extras), or Triton.
OPTIONAL_PACKAGES = {"accelerate", "apex", "av", "diffusers", "flash_attn", "megatron", "nvidia", "peft", "pyarrow",
                     "sentencepiece", "torchcodec", "transformer_engine", "transformers", "triton"}
MAX_LINES = 700


@dataclass(frozen=True)
class Import:
    module: str        # the importing module
    target: str        # the imported module (a vidpo module, resolved), or the external name
    line: int
    in_function: bool
    internal: bool


def package_modules(root: Path) -> dict[str, Path]:
    """``{module name: file}`` of every module of the three package roots under ``root``."""
    modules = {}
    for namespace, folder in PACKAGE_ROOTS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([namespace, *parts])] = path
    return modules


def _resolve(name: str, modules: dict) -> str:
    """The longest prefix of ``name`` that is a module (``vidpo.x.y.func`` -> ``vidpo.x.y``)."""
    while name and name not in modules and name != "vidpo._C":
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, modules: dict) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module
                names = [f"{source}.{alias.name}" for alias in child.names]
            else:
                visit(child, inside)
                continue
            for name in names:
                internal = name == "vidpo" or name.startswith("vidpo.")
                target = _resolve(name, modules) if internal else name
                if target != module:
                    found.append(Import(module, target, child.lineno, in_function, internal))
    visit(tree, False)
    return found


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in {Path(__file__).name}")
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def check_tree(root: Path) -> list[str]:
    """Every layering problem of the source tree under ``root``, one line each (empty: the tree is clean)."""
    modules = package_modules(root)
    problems, graph = [], {m: set() for m in modules}
    for module, path in modules.items():
        rel = path.relative_to(root)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{rel}: {lines} lines (at most {MAX_LINES}: split it by concern)")
        for imp in imports_of(module, path, modules):
            if imp.in_function and not (imp.internal and imp.target == "vidpo._C") \
                    and imp.target.split(".")[0] not in OPTIONAL_PACKAGES:
                problems.append(f"{rel}:{imp.line}: imports {imp.target} inside a function (only optional "
                                f"packages may be imported lazily)")
            if not imp.internal:
                continue
            graph[module].add(imp.target)
            if layer_of(imp.target) > layer_of(module):
                problems.append(f"{rel}:{imp.line}: {module} ({LAYERS[layer_of(module)][0]}) imports {imp.target} "
                                f"({LAYERS[layer_of(imp.target)][0]}), a higher layer")
    for cycle in _cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_package_imports_go_down_the_layers_without_cycles():
    problems = check_tree(REPO)
    assert not problems, "\n".join(problems)


@pytest.fixture
def tree_copy(tmp_path):
    for folder in PACKAGE_ROOTS.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert check_tree(tmp_path) == []
    return tmp_path


def _plant(path: Path, text: str, *, after: str = "from __future__ import annotations\n") -> None:
    source = path.read_text()
    assert after in source
    path.write_text(source.replace(after, after + text, 1))


def test_checker_catches_a_planted_upward_import(tree_copy):
    _plant(tree_copy / "models" / "flow.py", "from vidpo.stages.pipeline import run_pipeline\n")
    problems = check_tree(tree_copy)
    assert any(p.startswith("models/flow.py:") and "vidpo.models.flow (models) imports vidpo.stages.pipeline "
               "(stages), a higher layer" in p for p in problems), problems
    # the stages import the flow module, so the planted edge also closes a cycle; nothing else is reported
    assert all("a higher layer" in p or p.startswith("import cycle:") for p in problems), problems


def test_checker_catches_a_planted_cycle(tree_copy):
    # policy.py imports modeling.py; both are in the core layer, so only the cycle is wrong.
    _plant(tree_copy / "engine" / "training" / "modeling.py", "from vidpo.training.policy import make_reference\n")
    problems = check_tree(tree_copy)
    assert problems == ["import cycle: vidpo.training.modeling -> vidpo.training.policy"], problems


def test_checker_catches_an_import_hidden_in_a_function(tree_copy):
    path = tree_copy / "engine" / "stages" / "generate.py"
    source = path.read_text()
    assert "\ndef generate_pairs(" in source
    path.write_text(source.replace("\ndef generate_pairs(", "\ndef _late():\n    from vidpo.ipo import rounds\n"
                                   "    return rounds\n\n\ndef generate_pairs(", 1))
    problems = check_tree(tree_copy)
    assert any(p.startswith("engine/stages/generate.py:") and "vidpo.ipo.rounds inside a function" in p
               for p in problems), problems


def test_checker_catches_an_oversized_file(tree_copy):
    path = tree_copy / "engine" / "utils" / "seeding.py"
    path.write_text(path.read_text() + "\n" * MAX_LINES)
    assert any("utils/seeding.py" in p and "lines (at most 700" in p for p in check_tree(tree_copy))
