"""No module reaches into another object's private names: each stage is used through its public interface.

The rule, checked on the source of every module under pipeline/ and tests/ (parsed with ``ast``, nothing
imported): a name that starts with one underscore (dunders like ``__name__`` are public) may be used

- as an attribute only of ``self`` or ``cls`` (``self._lock``), not of another object or module
  (``store._list``, ``atlas._write_key``);
- by name, unqualified, inside the module that defines it (a module's own ``_helper()``);
- not through ``getattr``/``setattr``/``delattr``/``hasattr`` (``monkeypatch.setattr`` included) with a
  literal name, nor ``from module import _name``.

The few privates of other libraries that have no public equivalent are named in ALLOWED, each with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("pipeline", "tests")

# expression (as ast.unparse writes it) -> why no public name does it
ALLOWED = {
    "os._exit": "the standard library's exit without clean-up: a test kills a worker process as a crash does",
    "block.attn.qkv._forward_hooks": "torch keeps a module's hooks there; a test checks that none is left",
    "model._pos_embed": "timm's ViT step that adds position embeddings; the classifier probe runs the "
                        "model's forward in pieces, and timm has no public name for that step",
}
_REFLECTION = {"getattr", "setattr", "delattr", "hasattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str) -> list[tuple[int, str]]:
    """(line, what) of every use of another object's private name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) and ast.unparse(node) not in ALLOWED:
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in _REFLECTION:
                for argument in node.args[:2]:
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str) and any(
                            _private(part) for part in argument.value.split(".")):
                        found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"from {node.module} import {alias.name}")
                      for alias in node.names if _private(alias.name)]
    return found


def modules() -> list[Path]:
    return sorted(path for folder in CHECKED for path in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_module_uses_another_objects_private_names(path):
    found = violations(path.read_text())
    assert not found, "\n".join(f"{path.relative_to(REPO)}:{line}: {what}" for line, what in found)


@pytest.mark.parametrize("planted", [
    "store._list(path)",
    "Store._promote",
    "monkeypatch.setattr(Store, '_publish', broken)",
    "monkeypatch.setattr('pipeline.store.store._publish', broken)",
    "getattr(writer, '_seen')",
    "from pipeline.store.store import _model_dir",
    "self.store._checked_parts.add(path)",
])
def test_the_check_finds_a_planted_private_use(planted):
    assert violations(planted)


@pytest.mark.parametrize("allowed", [
    "self._lock.acquire()",
    "cls._instances",
    "_helper(value)",
    "module.__name__",
    "type(self).__qualname__",
    "setattr(record, 'key', value)",
    "os._exit(1)",
])
def test_the_check_allows_what_the_rule_allows(allowed):
    assert not violations(allowed)


def test_every_allowed_private_is_still_used():
    used = {ast.unparse(node) for path in modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute)}
    assert set(ALLOWED) <= used, sorted(set(ALLOWED) - used)
