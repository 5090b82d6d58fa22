"""Architecture rules of ``src/gpipe``, checked on the source text (AST), not at run time.

The rules (the project's acceptance rule): no module reads another module's private names, no
module reads or sets another object's private attributes that a different gpipe module defines,
and no ``# fmt: skip`` / ``# fmt: off`` (packed lines) anywhere in ``src``. Each failure lists every
violation as ``file:line: what``.

Private means a name with one leading underscore (dunders are public protocol). An attribute
``expr._x`` counts when ``expr`` is not ``self``/``cls``/``super()`` and ``_x`` is *defined* (as
``self._x = ...``, a class attribute or a ``def _x``) in another gpipe module and not in the
reading module itself: that ignores torch's private attributes (``._modules``) and a class's own
use of ``other._x`` on an instance of itself. Assigning ``expr._x`` is a violation unless this
module's own class defines ``_x`` (setting another object's private attribute); an attribute
set that way counts as defined by the setter, so its readers elsewhere are reported too.

One case per package, so a package made clean stays clean while others are still being worked on.
"""

from __future__ import annotations

import ast
import tokenize
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = SRC / "gpipe"

# Packages (and modules) still being rewritten: their cases report but do not fail yet.
PENDING: set[str] = set()  # packages allowed to fail while they are rewritten
# Modules checked as a case of their own, apart from their package.
OWN_CASE = {"gpipe.core.auto": "core.auto"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Module:
    name: str  # dotted: gpipe.stage.rng
    path: Path
    tree: ast.Module
    is_package: bool


@cache
def _modules() -> dict[str, Module]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        mods[name] = Module(name, path, ast.parse(path.read_text(), str(path)), is_package)
    return mods


def _defined_attrs(tree: ast.Module) -> set[str]:
    """Private attribute names this module defines: ``self._x =``, class attributes, ``def _x``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.add(item.name)
                elif isinstance(item, ast.Assign):
                    out.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out.add(item.target.id)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if (
                        isinstance(t, ast.Attribute)
                        and isinstance(t.value, ast.Name)
                        and t.value.id in ("self", "cls")
                    ):
                        out.add(t.attr)
    return {n for n in out if _is_private(n)}


def _set_on_others(tree: ast.Module) -> set[str]:
    """Private attribute names this module assigns on objects other than ``self``/``cls``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and _is_private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            out.add(node.attr)
    return out


@cache
def _attr_homes() -> dict[str, frozenset[str]]:
    homes: dict[str, set[str]] = defaultdict(set)
    for mod in _modules().values():
        for attr in _defined_attrs(mod.tree) | _set_on_others(mod.tree):
            homes[attr].add(mod.name)
    return {k: frozenset(v) for k, v in homes.items()}


def _resolve(mod: Module, level: int, target: str | None) -> str:
    """The absolute module path of a (possibly relative) ``from ... import``."""
    if level == 0:
        return target or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _violations(mod: Module) -> list[str]:
    mods = _modules()
    homes = _attr_homes()
    own = _defined_attrs(mod.tree)
    set_here = _set_on_others(mod.tree)
    where = mod.path.relative_to(SRC.parent) if mod.path.is_relative_to(SRC) else mod.path
    found: list[tuple[int, str]] = []
    module_aliases: dict[str, str] = {}  # local name -> gpipe module it is bound to

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gpipe") and alias.asname:
                    module_aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(mod, node.level, node.module)
            if not source.startswith("gpipe"):
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in mods:
                    module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif _is_private(alias.name) and source != mod.name:
                    found.append((node.lineno, f"imports private {source}.{alias.name}"))

    for node in ast.walk(mod.tree):
        if (  # getattr(obj, "_x"), setattr(obj, "_x", v), ...: the same rule by name
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            attr, obj = node.args[1].value, node.args[0]
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
                continue
            if attr in own or attr not in homes:
                continue
            defined_in = ", ".join(sorted(homes[attr]))
            found.append((node.lineno, f"{ast.unparse(node)} (private, defined in {defined_in})"))
            continue
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in module_aliases:
            other = module_aliases[value.id]
            if other != mod.name:
                found.append((node.lineno, f"reads private {other}.{node.attr}"))
            continue
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "super"
        ):
            continue
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            if node.attr not in own:  # a private attribute of an object this module does not define
                found.append((node.lineno, f"sets {ast.unparse(node)} (another object's private)"))
            continue
        if node.attr in own or node.attr in set_here or node.attr not in homes:
            continue
        verb = "reads"
        defined_in = ", ".join(sorted(homes[node.attr]))
        found.append(
            (node.lineno, f"{verb} {ast.unparse(node)} (private, defined in {defined_in})")
        )

    with tokenize.open(mod.path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.COMMENT and (
                "fmt: skip" in tok.string or "fmt: off" in tok.string
            ):
                found.append((tok.start[0], f"packed line: {tok.string.strip()}"))

    return [f"{where}:{line}: {what}" for line, what in sorted(set(found))]


def _package_of(name: str) -> str:
    if name in OWN_CASE:
        return OWN_CASE[name]
    parts = name.split(".")
    if len(parts) == 2 and not _modules()[name].is_package and name != "gpipe":
        return "(top level)"
    return parts[1] if len(parts) > 1 else "(top level)"


def _packages() -> list[str]:
    return sorted({_package_of(name) for name in _modules()})


def _package_violations(package: str) -> list[str]:
    return [
        v
        for name, mod in sorted(_modules().items())
        if _package_of(name) == package
        for v in _violations(mod)
    ]


@pytest.mark.parametrize(
    "package",
    [
        pytest.param(
            p,
            marks=pytest.mark.xfail(
                strict=False, reason=f"gpipe.{p} is being rewritten; flip when it is clean"
            ),
        )
        if p in PENDING
        else p
        for p in _packages()
    ],
)
def test_no_private_access_and_no_packed_lines(package: str) -> None:
    violations = _package_violations(package)
    assert not violations, f"{len(violations)} violation(s) in gpipe.{package}:\n" + "\n".join(
        violations
    )


def test_checker_catches_each_kind(tmp_path: Path) -> None:
    """The checker itself reports each rule on a module that breaks it (it can fail)."""
    src = (
        "from gpipe.stage import rng\n"
        "from gpipe.stage.rng import _tls\n"
        "def f(s):\n"
        "    s._codes = 1\n"
        "    return rng._tls, s._modules, getattr(s, '_codes')\n"
        "x = 1  # fmt: skip\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(src)
    text = "\n".join(_violations(Module("gpipe.stage.probe", path, ast.parse(src), False)))
    assert "imports private gpipe.stage.rng._tls" in text
    assert "reads private gpipe.stage.rng._tls" in text
    assert "sets s._codes (another object's private)" in text
    assert "getattr(s, '_codes')" in text
    assert "fmt: skip" in text
    assert "_modules" not in text
