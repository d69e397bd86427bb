"""Every non-public upstream API mm-trainer relies on (mm_trainer/private_api.py) still exists with the parameters we
pass, and nothing in the package imports a private upstream name the list does not hold."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from mm_trainer.upstream import PRIVATE_APIS

PACKAGE = Path(__file__).resolve().parents[1] / "mm_trainer"


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda a: a.path)
def test_private_api_exists_with_the_parameters_we_pass(api):
    obj = api.resolve()
    if not api.parameters:  # a class or a constant: its existence is what we rely on
        assert api.why and api.used_in and api.pinned_by
        return
    params = inspect.signature(obj).parameters
    missing = [p for p in api.parameters if p not in params]
    assert not missing, f"{api.path} no longer takes {missing}: check {api.used_in}"
    assert api.why and api.used_in and api.pinned_by


def test_every_private_upstream_import_is_listed():
    listed = {(a.path.split(":")[0], a.path.split(":")[1].split(".")[0]) for a in PRIVATE_APIS}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            module = node.module
            if module.split(".")[0] not in ("trl", "peft", "transformers", "bitsandbytes"):
                continue
            private_module = any(part.startswith("_") for part in module.split("."))
            deep = module.count(".") >= 2 and module.split(".")[0] in ("trl", "peft")
            for alias in node.names:
                if alias.name.startswith("_") or private_module or (deep and module not in _PUBLIC_DEEP_MODULES):
                    found.add((module, alias.name, path.name))
    unlisted = sorted(f"{m}.{n} ({f})" for m, n, f in found if (m, n) not in listed)
    assert not unlisted, f"private upstream APIs not listed in mm_trainer/private_api.py: {unlisted}"


_PUBLIC_DEEP_MODULES = {"peft.tuners.lora", "peft.tuners.lora.eva"}
"""Submodules documented as public by their library (PEFT documents its LoRA layer classes, and its EVA guide imports
from `peft.tuners.lora.eva`)."""
