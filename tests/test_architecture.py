"""The layering of docs/architecture.md, read from the sources: imports go one way, no module
imports another's private name, and there is no import circle.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency).
"""

import ast
import fnmatch
import os
import re
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
    "application": "application",
    "demo": "demo",
    "serving": "serving",
    "comfyui": "comfyui",
    "cli": "cli",
}
# What each layer may import besides itself: cli -> demo, serving (and comfyui) -> application -> api -> pipelines ->
# parallel -> kernels, runtime, planning -> geometry -> config -> errors.
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
    "application": {"api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "demo": {"application", "api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "serving": {"application", "api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "comfyui": {"application", "api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
    "cli": {"demo", "serving", "application", "api", "pipelines", "parallel", "kernels", "runtime", "planning", "geometry", "config", "errors"},
}


def _modules() -> Dict[str, Path]:
    """Every source module of the installed package, by dotted name."""
    modules = {}
    folder = ROOT / "distripy"
    for path in folder.rglob("*.py"):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["distripy"] + parts)] = path
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


# -- The docs: architecture.md's modes table and Comm contract, and no path to a missing file -------

DOCS = ROOT / "docs"
ARCHITECTURE = DOCS / "architecture.md"


def _section(markdown: str, heading: str) -> str:
    """The text under ``## heading``, up to the next heading of that level or above."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*$(.*?)(?=^#{{1,2}} |\Z)", markdown, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _table_modes(section: str) -> List[str]:
    """The mode each row of the section's first table names (in backticks, in its first cell)."""
    rows = [line for line in section.splitlines() if line.lstrip().startswith("|")]
    assert len(rows) > 2, "no table in the section"
    modes = []
    for row in rows[2:]:  # past the header and its separator
        first_cell = row.strip().strip("|").split("|")[0]
        modes.extend(re.findall(r"`([^`]+)`", first_cell))
    return modes


def _modes_problems(section: str) -> List[str]:
    from distripy.config import DEFAULT_MODE, MODES

    listed = _table_modes(section)
    problems = [f"the table lacks `{mode}`" for mode in MODES if mode not in listed]
    problems += [f"the table lists `{mode}`, which is not in config.MODES" for mode in listed if mode not in MODES]
    problems += [f"the table lists `{mode}` twice" for mode in sorted(set(listed)) if listed.count(mode) > 1]
    named_default = set(re.findall(r"`(\w+)`,?\s+\(?(?:the\s+)?default\b", section))
    if named_default != {DEFAULT_MODE}:
        problems.append(f"the section names {sorted(named_default)} as the default mode, not `{DEFAULT_MODE}`")
    return problems


def test_the_modes_table_lists_config_modes_and_the_default():
    problems = _modes_problems(_section(ARCHITECTURE.read_text(), "Modes"))
    assert not problems, "docs/architecture.md, '## Modes': " + "; ".join(problems)


def test_the_modes_check_sees_a_missing_mode_and_a_wrong_default():
    stale = "The modes.\n\n| mode | halos |\n| --- | --- |\n| `corrected_async_gn` (default) | stale |\n| `warp` | x |\n"
    problems = " ".join(_modes_problems(stale))
    assert "lacks `exact`" in problems and "`warp`, which is not in config.MODES" in problems
    assert "names ['corrected_async_gn'] as the default mode" in problems


def _protocol_members(source: str) -> List[str]:
    """``Class.member`` for every public method and attribute of the ``Protocol`` classes of a
    module (a protocol deriving from another, ``class CapturableComm(Comm, Protocol)``, included)."""
    protocols: Set[str] = set()
    members = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {base.id for base in node.bases if isinstance(base, ast.Name)}
        if "Protocol" not in bases and not bases & protocols:
            continue
        protocols.add(node.name)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = item.name
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                name = item.target.id
            else:
                continue
            if not name.startswith("_"):
                members.append(f"{node.name}.{name}")
    return members


def _undocumented(members: List[str], markdown: str) -> List[str]:
    """The members whose name appears nowhere in ``markdown`` as code: `name`, `name(...)` or
    `Class.name...`."""
    return [
        member
        for member in members
        if not re.search(rf"`(?:\w+\.)?{re.escape(member.split('.')[1])}(?:\(|`)", markdown)
    ]


def test_every_method_of_the_comm_protocols_is_documented():
    members = _protocol_members((ROOT / "distripy" / "runtime" / "comm.py").read_text())
    assert {"Comm.all_gather", "Comm.shift", "Work.wait"} <= set(members), members
    missing = _undocumented(members, ARCHITECTURE.read_text())
    assert not missing, f"docs/architecture.md does not describe {missing} (runtime/comm.py's protocols)"


def test_the_comm_check_sees_an_undocumented_method():
    source = (
        "from typing import Protocol\n"
        "class Comm(Protocol):\n    rank: int\n    def shift(self, send, recv, distance): ...\n"
        "class CapturableComm(Comm, Protocol):\n    def join(self): ...\n    def _private(self): ...\n"
        "class Helper:\n    def ignored(self): ...\n"
    )
    members = _protocol_members(source)
    assert members == ["Comm.rank", "Comm.shift", "CapturableComm.join"]
    assert _undocumented(members, "`rank` and `shift(send, recv, distance)`") == ["CapturableComm.join"]


def _repository_files() -> Set[str]:
    """The repository's files (tracked, or new and not ignored), as paths from its root."""
    import subprocess

    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return {line for line in result.stdout.splitlines() if (ROOT / line).exists()}


def _exists(path: str, files: Set[str]) -> bool:
    path = path.rstrip("/")
    if any(character in path for character in "*?["):
        return any(fnmatch.fnmatch(name, path) for name in files)
    return path in files or any(name.startswith(path + "/") for name in files)


def _slugs(markdown: str) -> Set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-") for heading in headings}


def _broken_references(doc: Path, files: Set[str]) -> List[str]:
    """Every link, image and repository path in ``doc`` that names nothing in the repository."""
    text = doc.read_text()
    where = doc.relative_to(ROOT).as_posix()
    folder = doc.parent.relative_to(ROOT).as_posix()
    broken = []
    # Markdown links and images, relative to the page.
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(folder, path)) if path else where
        if resolved.startswith("..") or not _exists(resolved, files):
            broken.append(f"{where}: link ({target}): no {resolved} in the repository")
        elif anchor and resolved.endswith(".md") and anchor not in _slugs((ROOT / resolved).read_text()):
            broken.append(f"{where}: link ({target}): {resolved} has no heading #{anchor}")
    # Paths in code (inline spans and fenced blocks): those that start at the repository's root
    # (bench/e2e.py) or in the package (runtime/comm.py).
    roots = {name.split("/")[0] for name in files}
    packages = {name.split("/")[1] for name in files if name.startswith("distripy/") and name.count("/") > 1}
    code = re.findall(r"```.*?```|`[^`\n]+`", text, re.S)
    for token in {token for span in code for token in span.strip("`").split()}:
        token = token.strip("'\"(),;:").split("::")[0]
        first = token.split("/")[0]
        if "/" not in token or token.startswith("/"):
            continue
        if token.startswith("../"):
            candidates = [os.path.normpath(os.path.join(folder, token))]
        elif first in roots:
            candidates = [token]
        elif first in packages and (token.endswith((".py", "/"))):  # not `application/json`
            candidates = [f"distripy/{token}"]
        else:
            continue  # not a repository path: a user's file, an output, a URL's piece
        if not any(not c.startswith("..") and _exists(c, files) for c in candidates):
            broken.append(f"{where}: `{token}`: no such path in the repository")
    # Bare page names (DESIGN.md): some file of the repository must have that name.
    for name in set(re.findall(r"(?<![\w/.-])([\w-]+\.md)\b", text)):
        if not any(f == name or f.endswith("/" + name) for f in files):
            broken.append(f"{where}: {name}: no file of that name in the repository")
    return broken


def test_every_link_and_path_in_the_readme_and_the_docs_exists():
    files = _repository_files()
    broken = [
        problem
        for doc in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
        for problem in _broken_references(doc, files)
    ]
    assert not broken, "\n".join(broken)


def test_the_reference_check_sees_a_missing_file(tmp_path, monkeypatch):
    page = DOCS / "planted-reference-check.md"
    files = {"README.md", "docs/architecture.md", "bench/e2e.py", "distripy/runtime/comm.py"}
    text = (
        "See [the design](../DESIGN.md), [modes](architecture.md#modes), `runtime/comm.py`, "
        "`bench/e2e.py`, `bench/gone.py` and DESIGN.md.\n\n```bash\npython bench/missing.py\n```\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == page else "## Modes\n")
    broken = "\n".join(_broken_references(page, files))
    for expected in ("no DESIGN.md in the repository", "`bench/gone.py`", "`bench/missing.py`",
                     "DESIGN.md: no file of that name"):  # fmt: skip
        assert expected in broken, broken
    assert "runtime/comm.py" not in broken and "bench/e2e.py" not in broken and "#modes" not in broken
