"""The package's layout rule, read from the modules' imports (function-level imports included):

    core  <-  hf  <-  {eval, vllm}  <-  train  <-  cli

A part imports only the parts to its left (and itself); eval and vllm do not import each other; vllm takes from hf
its models module alone; core never imports transformers; the reference (the oracle) is imported only by the ops'
backward passes and the parallel evaluation form; and no modules import each other in a circle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "less_cuda"
FLOORS = {"_build": 0, "_build_info": 0, "core": 1, "checkpoints": 2, "hf": 3, "eval": 4, "vllm": 4, "train": 5, "cli": 6,
          "__main__": 7}  # fmt: skip
"""How far right each part stands: a module may import parts on lower floors and its own part. checkpoints (the
shipped maps and their lookup) sits between core, whose format it reads, and hf, which looks maps up there."""
REFERENCE = "less_cuda.core.reference"
MAY_IMPORT_REFERENCE = {"less_cuda.core.ops", "less_cuda.hf.parallel"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(source: str, package: str) -> set[str]:
    """Every module of the package and every outside package that `source` imports, by absolute name; `package` is
    the package the module's relative imports start from."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if is_module(f"{target}.{alias.name}")}
    return found


def package_of(path: Path) -> str:
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


MODULES = {module_name(path): imports(path.read_text(), package_of(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def part(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


def own(names: set[str]) -> set[str]:
    return {name for name in names if name.startswith("less_cuda.") and part(name) in FLOORS}


def test_every_module_belongs_to_a_part():
    assert {part(name) for name in MODULES} - {""} == set(FLOORS), "a new top-level module or folder needs a floor"


def test_the_package_face_imports_nothing_of_its_own():
    """`import less_cuda` loads no torch: its names are looked up on first use (the lazy table)."""
    assert own(MODULES["less_cuda"]) == set()


@pytest.mark.parametrize("name", sorted(name for name in MODULES if part(name)))
def test_imports_run_from_right_to_left(name):
    mine = part(name)
    wrong = sorted(target for target in own(MODULES[name])
                   if part(target) != mine and FLOORS[part(target)] >= FLOORS[mine])
    assert not wrong, f"{name} ({mine}, floor {FLOORS[mine]}) imports {wrong}, on its floor or to its right"


def test_vllm_takes_from_hf_its_models_alone():
    for name, targets in MODULES.items():
        if part(name) == "vllm":
            assert {t for t in own(targets) if part(t) == "hf"} <= {"less_cuda.hf", "less_cuda.hf.models"}, name


def test_core_never_imports_transformers():
    for name, targets in MODULES.items():
        if part(name) in ("core", "_build", "checkpoints"):
            assert not {t for t in targets if t.split(".")[0] in ("transformers", "vllm")}, name


def test_only_the_backward_passes_and_the_parallel_form_import_the_reference():
    importers = {name for name, targets in MODULES.items() if REFERENCE in targets}
    assert importers <= MAY_IMPORT_REFERENCE


def test_no_modules_import_each_other_in_a_circle():
    graph = {name: {t for t in own(targets) if t in MODULES and t != name} for name, targets in MODULES.items()}
    # A package's __init__ is imported with each of its modules; only its own imports count as its edges.
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError(f"circle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_reader_sees_relative_and_function_level_imports():
    """What a core module importing hf inside a function, and the reference, would be read as."""
    source = "from . import reference\n\ndef f():\n    from ..hf import cache\n    import transformers\n"
    assert imports(source, "less_cuda.core") == {"less_cuda.core", REFERENCE, "less_cuda.hf", "less_cuda.hf.cache",
                                                 "transformers"}


@pytest.mark.parametrize("old,new", [("less_cuda.models", "less_cuda.hf.models"),
                                     ("less_cuda.slots", "less_cuda.core.state")])
def test_old_module_paths_hand_on_the_new_modules_names_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert all(getattr(module, name) is getattr(moved, name) for name in vars(moved) if not name.startswith("__"))
    with pytest.raises(AttributeError):
        module.no_such_name
