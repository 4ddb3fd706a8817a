"""The layering of docs/architecture.md, read from the sources: imports go one way, no module
imports another's private name, and there is no import circle.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency). ``kernels/`` is read as the package ``distripy.kernels`` it is installed as.
"""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each module's layer, by its dotted name's first component(s) below ``distripy``.
LAYERS = {
    "errors": "errors",
    "_version": "errors",
    "config": "config",
    "geometry": "geometry",
    "planning": "planning",
    "kernels": "kernels",
    "runtime": "runtime",
    "parallel": "parallel",
    "pipelines": "pipelines",
    "api": "api",
    "": "api",  # the package root: lazy re-exports of the public names
    "demo": "demo",
    "serving": "serving",
    "cli": "cli",
}
# What each layer may import besides itself: cli -> demo, serving -> api -> pipelines -> parallel ->
# kernels, runtime, planning -> geometry -> config -> errors.
BELOW = {
    "errors": set(),
    "config": {"errors"},
    "geometry": {"config", "errors"},
    "planning": {"geometry", "config", "errors"},
    "kernels": {"config", "errors"},
    "runtime": {"config", "errors"},
    "parallel": {"kernels", "runtime", "planning", "geometry", "config", "errors"},
    "pipelines": {"parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "api": {"pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "demo": {"api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "serving": {"api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "cli": {"demo", "serving", "api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
}


def _modules() -> Dict[str, Path]:
    """Every source module of the installed package, by dotted name."""
    modules = {}
    for folder, package in ((ROOT / "distripy", "distripy"), (ROOT / "kernels", "distripy.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


MODULES = _modules()


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _layer(name: str) -> str:
    inner = name.split(".")[1:]
    return LAYERS[inner[0] if inner else ""]


def _imports(name: str) -> Iterator[Tuple[str, List[str], int]]:
    """``(imported module, names imported from it, line)`` for every import of a distripy module."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "distripy":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] != "distripy":
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            for submodule in submodules:
                yield f"{base}.{submodule}", [], node.lineno
            others = [n for n in names if n not in submodules]
            if others:
                yield base, others, node.lineno


def _edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in _imports(name):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_every_import_of_a_distripy_module_resolves():
    missing = [
        f"{_where(MODULES[name])}:{line}: {target}"
        for name in MODULES
        for target, _, line in _imports(name)
        if target not in MODULES and target != "distripy._C"
    ]
    assert not missing, missing


def test_imports_go_one_way():
    wrong = []
    for name in MODULES:
        layer = _layer(name)
        for target, _, line in _imports(name):
            if target not in MODULES:
                continue
            target_layer = _layer(target)
            if target_layer != layer and target_layer not in BELOW[layer]:
                wrong.append(f"{_where(MODULES[name])}:{line}: {layer} imports {target} ({target_layer})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    wrong = []
    for name in MODULES:
        own_package = name if _is_package(name) else name.rpartition(".")[0]
        for target, names, line in _imports(name):
            where = f"{_where(MODULES[name])}:{line}"
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    wrong.append(f"{where}: {imported} from {target}")
            private = [part for part in target.split(".") if part.startswith("_")]
            target_package = target.rpartition(".")[0]
            if private and target_package != own_package and target != "distripy._C":
                wrong.append(f"{where}: the private module {target} from outside {target_package}")
    assert not wrong, "\n".join(wrong)


def test_no_private_attribute_of_a_distripy_module_is_used_from_outside():
    """``import distripy.x as m; m._helper()`` is the same breach as ``from distripy.x import _helper``."""
    wrong = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("distripy") and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distripy"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != name
            ):
                wrong.append(f"{_where(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def _circles(graph: Dict[str, Set[str]]) -> List[str]:
    circles: List[str] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start)
    return circles


def test_there_is_no_import_circle():
    circles = _circles(_edges())
    assert not circles, "\n".join(circles)


def test_the_circle_check_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == ["a -> b -> c -> a"]
    assert _circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from distripy.api import _forward_of\n", "_forward_of from distripy.api"),
        ("import distripy.api as api\napi._forward_of(None)\n", "api._forward_of"),
    ],
)
def test_the_checks_see_a_breach(tmp_path, monkeypatch, source, expected):
    """The checks above are not vacuous: a planted private import is found."""
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    monkeypatch.setitem(MODULES, "distripy.planted", planted)
    monkeypatch.setitem(LAYERS, "planted", "cli")
    checks = (
        test_no_module_imports_a_private_name_of_another,
        test_no_private_attribute_of_a_distripy_module_is_used_from_outside,
    )
    messages = []
    for check in checks:
        try:
            check()
        except AssertionError as error:
            messages.append(str(error))
    assert any(expected in message for message in messages), messages


def test_the_layer_check_sees_an_upward_import(monkeypatch, tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from distripy.api import parallelize\n")
    monkeypatch.setitem(MODULES, "distripy.planted", planted)
    monkeypatch.setitem(LAYERS, "planted", "parallel")
    with pytest.raises(AssertionError, match="parallel imports distripy.api"):
        test_imports_go_one_way()


# Built-in exceptions a library module may still raise: the module attribute protocol
# (``__getattr__``) and unreachable internal invariants.
_BUILTIN_ALLOWED = {"AttributeError", "AssertionError"}


def test_every_error_the_library_raises_is_a_distripy_error():
    import builtins

    builtin_errors = {
        name
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    wrong = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id in builtin_errors - _BUILTIN_ALLOWED:
                wrong.append(f"{_where(path)}:{node.lineno}: raise {raised.id}")
    assert not wrong, "\n".join(wrong)


def test_the_error_classes_keep_their_built_in_bases():
    from distripy import errors

    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(cls, errors.DistripyError) for cls in classes)
    assert issubclass(errors.BandGeometryError, ValueError) and issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.UnsupportedModuleError, TypeError) and issubclass(
        errors.InputTypeError, TypeError
    )
    assert issubclass(errors.CommTimeoutError, TimeoutError) and issubclass(errors.CommError, RuntimeError)
    assert issubclass(errors.NativeRuntimeUnavailable, ImportError)


def test_the_error_check_sees_a_built_in_error(monkeypatch, tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f(x):\n    if x:\n        raise ValueError(f'bad {x}')\n")
    monkeypatch.setitem(MODULES, "distripy.planted", planted)
    with pytest.raises(AssertionError, match="planted.py:3: raise ValueError"):
        test_every_error_the_library_raises_is_a_distripy_error()
