"""The package's layers import one way: core ← training ← evaluation ← experiments ← cli.

    core/         the method (config, regularisers, losses, fused, reference, adapters, export)
    training/     the trainer mixin, the run configuration, train_run, data
    evaluation/   benchmarks of a trained model
    experiments/  compare grids and the lab
    cli/          the `balora` command

``utils`` and ``assets`` sit below all of them. Every ``import`` counts, at module level or inside a
function, so a cycle cannot be hidden in a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "balora"

# What each layer may import from balora (besides itself and the package root's __version__).
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "assets": {"utils"},
    "core": set(),
    "training": {"core", "utils", "assets"},
    "evaluation": {"core", "training", "utils", "assets"},
    "experiments": {"core", "training", "evaluation", "utils", "assets"},
    "cli": {"core", "training", "evaluation", "experiments", "utils", "assets"},
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _balora_imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, imported balora module path) for every import in ``source``, a module of ``package``
    (e.g. ``["balora", "core"]``); relative imports are resolved."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "balora"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "balora":
                continue
            if module == "balora":  # `from balora import x`: x may be a subpackage
                found += [(node.lineno, f"balora.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_belongs_to_a_layer():
    layers = {_layer(p) for p in _modules()}
    assert layers <= set(ALLOWED), f"modules outside the known layers: {sorted(layers - set(ALLOWED))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path):
    layer = _layer(path)
    wrong = []
    package = ["balora", *path.relative_to(PACKAGE).parent.parts]
    for line, module in _balora_imports(path.read_text(), package):
        parts = module.split(".")
        if len(parts) < 2 or parts[1] == "__version__":
            continue  # the package root: its lazy exports, __version__
        target = parts[1]
        if target != layer and target not in ALLOWED[layer]:
            wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} ({layer} -> {target})")
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_and_relative_imports():
    """The checker itself: an import hidden in a function, or written relative, is still found."""
    source = "def f():\n    from balora.training import run\n    from ..experiments import compare\n"
    assert {m for _, m in _balora_imports(source, ["balora", "core"])} == {"balora.training", "balora.experiments"}


def test_public_names_still_import_from_the_package_root():
    import balora

    for name in balora.__all__:
        assert getattr(balora, name) is not None, name
