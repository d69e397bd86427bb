"""Every non-public upstream name mm-trainer uses is in one registry (mm_trainer/upstream.py) and used only there.

The scan reads every module of the package: an import of a private upstream name or of a deep TRL / PEFT module, an
attribute access `obj._x` and a string constant `"_x"` (as in `getattr(obj, "_x")`) whose name mm-trainer does not
define itself are upstream private uses; they may appear in mm_trainer/upstream.py only, and only when an entry
lists them. Classes of mm-trainer that override a private method or attribute of an upstream base must list it too.
The scanner is itself tested on code that does each of these things, so the test cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import mm_trainer
from mm_trainer.upstream import KINDS, LIBRARIES, UPSTREAM, registered_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mm_trainer"
REGISTRY = PACKAGE / "upstream.py"
UPSTREAM_ROOTS = ("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "torch")
PUBLIC_DEEP_MODULES = {"peft.tuners.lora", "peft.tuners.lora.eva"}
"""Submodules documented as public by their library (PEFT documents its LoRA layer classes, and its EVA guide imports
from `peft.tuners.lora.eva`)."""

_PRIVATE = re.compile(r"^_[A-Za-z][A-Za-z0-9_]*$")


def _is_private(name: str) -> bool:
    return bool(_PRIVATE.match(name)) and not name.startswith("__")


def own_names(trees: list[ast.Module]) -> set[str]:
    """Private names mm-trainer defines: functions, classes, methods, class and module attributes, attributes it
    assigns on `self` / `cls`, and parameters (a private parameter name of ours in a signature)."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names.update(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
        for node in tree.body:  # module-level names
            for target in _targets(node):
                names.add(target)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in cls.body:  # class-level attributes
                names.update(_targets(node))
    return {n for n in names if _is_private(n)}


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _docstring_nodes(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def private_uses(tree: ast.Module, ours: set[str]) -> list[tuple[int, str, str]]:
    """`(line, kind, name)` of every upstream private use in `tree` (see the module docstring)."""
    uses = []
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = node.module
            root = module.split(".")[0]
            if root not in UPSTREAM_ROOTS:
                continue
            private_module = any(_is_private(part) for part in module.split("."))
            deep = root in ("trl", "peft") and module.count(".") >= 2 and module not in PUBLIC_DEEP_MODULES
            for alias in node.names:
                if _is_private(alias.name) or private_module or deep:
                    uses.append((node.lineno, "import", alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in UPSTREAM_ROOTS and any(_is_private(p) for p in parts):
                    uses.append((node.lineno, "import", alias.name))
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in ours:
            uses.append((node.lineno, "attribute", node.attr))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _is_private(node.value)
            and node.value not in ours
        ):
            uses.append((node.lineno, "string", node.value))
    return uses


def _package_trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use", [u for u in UPSTREAM if u.path is not None], ids=lambda u: u.path)
def test_registered_object_exists_with_the_parameters_we_pass(use):
    obj = use.resolve()
    if use.parameters:
        params = inspect.signature(obj).parameters
        missing = [p for p in use.parameters if p not in params]
        assert not missing, f"{use.path} no longer takes {missing}: check {use.used_in}"


@pytest.mark.parametrize("use", UPSTREAM, ids=lambda u: f"{u.library}:{u.kind}:{','.join(u.names) or u.why[:30]}")
def test_every_entry_is_complete(use):
    assert use.library in LIBRARIES and use.kind in KINDS
    assert use.why and use.used_in and use.pinned_by
    for file in re.findall(r"mm_trainer/[\w/]+\.py", use.used_in):
        assert (ROOT / file).is_file(), f"{file} (used_in of {use.names}) does not exist"
    for file in re.findall(r"tests/[\w/]+\.py", use.pinned_by):
        assert (ROOT / file).is_file(), f"{file} (pinned_by of {use.names}) does not exist"
    if use.kind in ("import", "attribute", "override"):
        assert use.names, "an import, attribute or override names what it uses"


def test_private_upstream_names_are_used_only_in_the_registry_and_listed_there():
    trees = _package_trees()
    ours = own_names(list(trees.values()))
    registered = registered_names()
    outside, unlisted = [], []
    for path, tree in trees.items():
        for line, kind, name in private_uses(tree, ours):
            where = f"{path.relative_to(ROOT)}:{line} {kind} {name}"
            if path != REGISTRY:
                outside.append(where)
            elif name not in registered:
                unlisted.append(where)
    assert not outside, (
        f"private upstream names used outside mm_trainer/upstream.py (add an accessor there): {outside}"
    )
    assert not unlisted, (
        f"private upstream names used in mm_trainer/upstream.py but not listed in UPSTREAM: {unlisted}"
    )


def test_overridden_private_upstream_members_are_listed():
    registered = {name for use in UPSTREAM if use.kind == "override" for name in use.names}
    found = set()
    for info in pkgutil.walk_packages(mm_trainer.__path__, "mm_trainer."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            upstream_bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in UPSTREAM_ROOTS]
            if not upstream_bases:
                continue
            # What the class and its mm-trainer mixins define themselves (not what a metaclass adds).
            ours = [k for k in cls.__mro__ if k.__module__.startswith("mm_trainer.")]
            for name in set().union(*(_class_body_names(k) for k in ours)):
                if _is_private(name) and any(hasattr(base, name) for base in upstream_bases):
                    found.add((cls.__qualname__, name))
    unlisted = sorted(f"{c}.{n}" for c, n in found if n not in registered)
    assert not unlisted, f"private upstream members overridden but not listed as overrides in UPSTREAM: {unlisted}"
    assert {n for _, n in found} >= {"_push_from_checkpoint", "_tag_names"}, found


def _class_body_names(cls: type) -> set[str]:
    body = ast.parse(inspect.getsource(cls).lstrip()).body[0].body
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            args = node.args if not isinstance(node, ast.ClassDef) else None
            if args is not None:  # a private parameter of an overridden public method (`_internal_call`)
                names.update(a.arg for a in [*args.args, *args.kwonlyargs] if node.name in vars(cls))
        names.update(_targets(node))
    return names


def test_the_scanner_sees_each_kind_of_private_use():
    # What the package test relies on: each of these is flagged, and names the code defines itself are not.
    code = """
from trl.trainer.utils import create_model_from_path
from transformers.trainer import _is_peft_model
import torch.nn.modules.conv
from peft.tuners.lora import LoraLayer

class Ours:
    def __init__(self):
        self._mine = 1

def f(model, config):
    model._parameters["w"] = None
    getattr(config, "_name_or_path", None)
    return self._mine, model._mine
"""
    tree = ast.parse(code)
    uses = {(kind, name) for _, kind, name in private_uses(tree, own_names([tree]))}
    assert uses == {
        ("import", "create_model_from_path"),  # a deep TRL module
        ("import", "_is_peft_model"),  # a private name
        ("attribute", "_parameters"),
        ("string", "_name_or_path"),
    }, uses


def test_checkpoint_prefix_is_the_trainers():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from mm_trainer.utils.checkpoints import CHECKPOINT_PREFIX, checkpoint_dir, checkpoint_step

    assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    assert checkpoint_step(checkpoint_dir("out", 12)) == 12
