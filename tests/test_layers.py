"""The import-layer contract of ``studio/``, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` counts, at module level or inside a function, relative ones
resolved. A module may import modules of its own rank or a lower one; the components of an
``INDEPENDENT`` rank never import each other; the tiny model kit is a tool that only ``TINY_IMPORTERS``
may import. A module the table does not cover fails the test: place new modules deliberately.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

# component (a module, or a package with everything under it) -> rank; the longest match wins, and
# "studio" stands for the package's own __init__ only: the public facade (lazy re-exports of the API).
LAYERS: dict[str, int] = {
    "studio": 6,
    "studio._version": 0,
    "studio.types": 0,
    "studio.errors": 0,
    "studio.files": 0,
    "studio.compat": 0,
    "studio.config": 1,
    "studio.audit": 2,
    "studio.provenance": 2,
    "studio.models": 2,
    "studio.imageio": 2,
    "studio.geometry": 2,
    "studio.prompts": 2,
    "studio.styles": 2,
    "studio.adapter": 3,
    "studio.draft": 4,
    "studio.faces": 4,
    "studio.safety": 4,
    "studio.recipe": 5,
    "studio.infotext": 5,
    "studio.request": 5,
    "studio.output": 5,
    "studio.prepare": 5,
    "studio.results": 5,
    "studio.qa": 5,
    "studio.verify": 5,
    "studio.pipeline": 6,
    "studio.api": 6,
    "studio.batch": 7,
    "studio.cli": 8,
    "studio.web": 8,
    "studio.models.tiny": 9,  # a tool (the tiny kit builder): see TINY_IMPORTERS
}
INDEPENDENT = {4}  # ranks whose components are peers: draft never imports faces, nor faces draft
TINY = "studio.models.tiny"
TINY_IMPORTERS = {
    "studio.models",  # builds the tiny profile's kit on first use
    "studio.cli.models",  # the `make-tiny` command
}

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "studio"


# --- the checker ------------------------------------------------------------------------------


def module_name(path: Path, root: Path = ROOT) -> str:
    """``studio/draft/load.py`` -> ``studio.draft.load``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(module: str, source: str, *, is_package: bool, known: set[str]) -> Iterator[str]:
    """Every studio module that ``source`` imports, anywhere in the file, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(package, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in known else base  # `from studio.models import tiny`


def _resolve(package: str, level: int, name: str | None) -> str:
    """The absolute module of ``from <.. level><name> import``, seen from ``package``."""
    if level == 0:
        return name or ""
    parts = package.split(".")
    anchor = parts[: len(parts) - (level - 1)]
    return ".".join([*anchor, name] if name else anchor)


def component(module: str) -> str | None:
    """The ``LAYERS`` key that covers ``module`` (its longest prefix), or None when none does."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in LAYERS and (key != "studio" or module == "studio"):
            return key
    return None


def check_source(
    module: str, source: str, *, is_package: bool = False, known: Iterable[str] = ()
) -> list[str]:
    """Each layer-rule violation of ``module``'s source, as one readable line."""
    own = component(module)
    if own is None:
        return [f"{module} is not in LAYERS: add it to the table at the top of tests/test_layers.py"]
    problems = []
    for target in sorted(set(imported_modules(module, source, is_package=is_package, known=set(known)))):
        if target.split(".")[0] != "studio":
            continue
        other = component(target)
        if other is None:
            problems.append(f"{module} imports {target}, which is not in LAYERS: add it to the table")
        elif other == TINY:
            if own != TINY and module not in TINY_IMPORTERS:
                problems.append(
                    f"{module} imports the tiny model kit ({target}); only {sorted(TINY_IMPORTERS)} may"
                )
        elif LAYERS[other] > LAYERS[own]:
            problems.append(f"{module} (rank {LAYERS[own]}) imports {target} (rank {LAYERS[other]}): upward")
        elif LAYERS[other] == LAYERS[own] in INDEPENDENT and other != own:
            problems.append(f"{module} imports {target}: {own} and {other} are independent peers")
    return problems


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``package``, by dotted name."""
    return {module_name(path): path for path in sorted(package.rglob("*.py"))}


# --- the contract -----------------------------------------------------------------------------


def test_every_studio_module_keeps_to_its_layer() -> None:
    modules = package_modules()
    assert len(modules) > 40, sorted(modules)  # the walk found the package
    problems = [
        problem
        for name, path in modules.items()
        for problem in check_source(
            name, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py", known=set(modules)
        )
    ]
    assert not problems, "import-layer violations:\n" + "\n".join(problems)


# --- the checker catches what it must (so the contract cannot pass vacuously) ----------------

KNOWN = {
    "studio",
    "studio.draft",
    "studio.draft.load",
    "studio.faces",
    "studio.faces.swap",
    "studio.models",
    "studio.models.tiny",
    "studio.models.tiny.diffusion",
    "studio.pipeline",
    "studio.config",
}


@pytest.mark.parametrize(
    ("module", "source", "is_package", "expected"),
    [
        (
            "studio.config",
            "import studio.pipeline\n",
            False,
            "studio.config (rank 1) imports studio.pipeline",
        ),
        ("studio.draft.load", "def f():\n    from studio.faces import swap\n", False, "independent peers"),
        (
            "studio.faces.swap",
            "from ..draft import load\n",
            False,
            "studio.faces.swap imports studio.draft.load",
        ),
        (
            "studio.faces",
            "from . import swap\nfrom ..pipeline import Studio\n",
            True,
            "imports studio.pipeline",
        ),
        ("studio.models.cache", "from .tiny import make_tiny_kit\n", False, "imports the tiny model kit"),
        (
            "studio.draft.base_configs",
            "from studio.models.tiny.diffusion import x\n",
            False,
            "tiny model kit",
        ),
        ("studio.adapter.x", "from studio.models import tiny\n", False, "imports the tiny model kit"),
        ("studio.newthing", "import os\n", False, "studio.newthing is not in LAYERS: add it to the table"),
        (
            "studio.draft.load",
            "from studio.nowhere import x\n",
            False,
            "studio.nowhere, which is not in LAYERS",
        ),
    ],
)
def test_checker_reports_violations(module: str, source: str, is_package: bool, expected: str) -> None:
    problems = check_source(module, source, is_package=is_package, known=KNOWN)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        (
            "studio.pipeline",
            "from studio.draft import load\nfrom studio.faces import swap\nimport numpy\n",
            False,
        ),
        (
            "studio.draft.load",
            "from . import base_configs\nfrom ..models import cache\nfrom studio.errors import StudioError\n",
            False,
        ),
        ("studio.models", "def f():\n    from studio.models.tiny import make_tiny_kit\n", True),
        ("studio.cli.models", "from studio.models.tiny import make_tiny_kit\n", False),
        ("studio.models.tiny.sdxl", "from studio.adapter import x\nfrom .diffusion import y\n", False),
        (
            "studio.faces.swap",
            "from studio.faces.detect import x\nfrom studio.adapter.tokens import y\n",
            False,
        ),
    ],
)
def test_checker_allows_what_the_table_allows(module: str, source: str, is_package: bool) -> None:
    assert check_source(module, source, is_package=is_package, known=KNOWN) == []


def test_relative_imports_resolve_from_modules_and_packages() -> None:
    assert _resolve("studio.faces", 1, "swap") == "studio.faces.swap"
    assert _resolve("studio.faces", 2, "draft.load") == "studio.draft.load"
    assert _resolve("studio.faces", 2, None) == "studio"
    assert module_name(ROOT / "studio" / "faces" / "__init__.py") == "studio.faces"
    found = set(imported_modules("studio.faces", "from . import swap\n", is_package=True, known=KNOWN))
    assert found == {"studio.faces.swap"}
