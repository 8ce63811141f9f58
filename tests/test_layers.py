"""The layering rule, checked: a module imports only modules of its own layer or lower ones.

Every import counts, including the lazy ones inside functions. A new module must be given a
layer here, so the picture in docs/design.md and this list stay one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "multibus"

# Lowest first. A module is named by its dotted path below multibus; a package name covers
# every module in it.
LAYERS: list[tuple[str, ...]] = [
    ("wakeup", "names", "lockfile", "rundir", "fastexit", "systemd", "logview", "logring",
     "logprinter", "fdbudget", "logfiles", "containment", "guardian", "readiness", "targets",
     "sockets"),
    ("bus", "__init__"),
    ("plugins",),
    ("transport",),
    ("order", "specs", "restart", "child", "procs", "zygote", "zygoteclient", "worker", "launcher"),
    ("fleet", "spawner", "keeper", "groupops", "reconcile", "config", "preflight", "supervisor",
     "recycle", "programs", "reload", "hostconf"),
    ("actions", "statustext", "commands", "opqueue", "controlclient", "control", "upstream",
     "downstream"),
    ("runner", "cli", "__main__"),
]

# Third-party imports a layer must not make: the bus knows nothing of zmq or psutil, the
# transport knows nothing of spawning.
FORBIDDEN = {
    "bus": ("zmq", "psutil", "msgpack", "subprocess"),
    "transport": ("subprocess", "psutil"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def _layer_of(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return rank
    raise AssertionError(
        f"multibus.{module} has no layer: add it to LAYERS in {Path(__file__).name} "
        "and to the layout in docs/design.md"
    )


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import in ``path``; multibus modules unprefixed."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rpartition(".")[0]
    if path.name == "__init__.py":
        package = _module_name(path.parent / "x.py").rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join([*base, node.module or ""]).strip(".")
                module = "multibus." + name if name else "multibus"
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            for alias in node.names:  # from multibus import supervisor: a module too
                if _is_module(f"{module}.{alias.name}"):
                    found.append((f"{module}.{alias.name}", node.lineno))
    return found


def _is_module(dotted: str) -> bool:
    if not dotted.startswith("multibus."):
        return False
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    for path in _modules():
        _layer_of(_module_name(path))


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in _modules():
        me = _module_name(path)
        mine = _layer_of(me)
        for imported, line in _imports(path):
            if imported == "multibus" or not imported.startswith("multibus."):
                continue
            target = imported.removeprefix("multibus.")
            if _layer_of(target) > mine:
                wrong.append(f"multibus/{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert not wrong, "imports upward:\n" + "\n".join(wrong)


def test_lower_layers_know_nothing_of_what_sits_above_them():
    wrong = []
    for path in _modules():
        me = _module_name(path)
        banned = next((v for k, v in FORBIDDEN.items() if me == k or me.startswith(k + ".")), ())
        for imported, line in _imports(path):
            if imported.split(".")[0] in banned:
                wrong.append(f"multibus/{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)
