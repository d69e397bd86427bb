"""The package layout is the architecture: each subpackage imports only from the layers below it, and the
trainer-independent core never reads a trainer.

    utils, upstream, metrics   helpers and the registry of upstream private names
    distributed                the engine a run trains under and what sharding asks of us
    model                      the model map: towers, modality, probe, targets, release, loading
    audit, imod, quant         the audit, IMoD and the dominance rate, 4-bit
    core                       the trainer-independent run, composed from the parts above
    training                   the glue to TRL's trainers (mixin, trainers, configs, callbacks)
    cli                        the `mm-trainer` command
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mm_trainer"

LAYERS: dict[str, int] = {
    "utils": 0,
    "upstream": 0,
    "metrics": 0,
    "distributed": 1,
    "model": 2,
    "audit": 3,
    "imod": 3,
    "quant": 3,
    "core": 4,
    "training": 5,
    "cli": 6,
}
GLUE = ("training", "cli")
"""What core code may never import: the trainer glue and the command line."""


def _part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """`(line, subpackage)` of every import of an mm_trainer subpackage in `path` (or in `text`, as if at `path`)."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = package[:-1]  # the package holding the module (an __init__ is its own package's member)
    out = []
    for node in ast.walk(ast.parse(text if text is not None else path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            if isinstance(node, ast.Import):
                out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("mm_trainer.")]
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        parts = module.split(".")
        if parts[0] != "mm_trainer":
            continue
        if len(parts) > 1:
            out.append((node.lineno, parts[1]))
        else:  # `from mm_trainer import x` / `from .. import x`: x is a subpackage or a top-level name
            out += [(node.lineno, a.name) for a in node.names if a.name in LAYERS]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem in LAYERS)


def test_every_subpackage_has_a_layer():
    parts = {_part_of(p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"}
    assert parts <= set(LAYERS), f"place these in LAYERS: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers_only(path):
    part = _part_of(path)
    upward = [
        f"line {line}: {part} imports {target}"
        for line, target in _imported_parts(path)
        if target in LAYERS and target != part and LAYERS[target] >= LAYERS[part]
    ]
    assert not upward, upward


@pytest.mark.parametrize(
    "path", [p for p in MODULES if _part_of(p) not in GLUE], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_core_never_imports_glue_nor_reads_a_trainer(path):
    glue = [f"line {line}: imports {t}" for line, t in _imported_parts(path) if t in GLUE]
    assert not glue, glue
    if path.name == "upstream.py":
        return  # the registry's accessor of `Trainer._save` takes the trainer it saves
    reads = _trainer_reads(ast.parse(path.read_text(encoding="utf-8")))
    assert not reads, f"core code handles a trainer at lines {reads}: take explicit inputs instead"


def _trainer_reads(tree: ast.Module) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == "trainer")
        or (isinstance(node, ast.arg) and node.arg == "trainer")
        or (isinstance(node, ast.Attribute) and node.attr == "trainer")
    ]


def test_the_checks_see_what_they_forbid():
    # What the tests above rely on: upward and glue imports, relative or absolute, and a trainer read are found.
    text = "from ..training.mixin import MMTrainerMixin\nfrom mm_trainer.cli import main\nfrom .. import core\n"
    found = {t for _, t in _imported_parts(PACKAGE / "model" / "towers.py", text)}
    assert found == {"training", "cli", "core"}
    assert _trainer_reads(ast.parse("def f(trainer):\n    return trainer.args, self.trainer\n")) == [1, 2, 2]
