"""The package's layout holds: imports run downwards only (issue 12).

Layers, top to bottom: ``cli`` (and the ``client`` alias), the capability packages (``mining``,
``training``, ``evaluation``, ``serving``), ``raycluster`` (the Ray helpers they share), the library
(everything else: ``models``, ``weights``, ``data``, ``inference``, ``outputs``, ``config``, ``device``).
The library imports no Ray and nothing above it; no capability imports another; inside a capability
only its one Ray module touches Ray. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ovseg_ray"
CAPABILITIES = ("mining", "training", "evaluation", "serving")
RAY_MODULES = {"mining": "pipeline", "training": "engine", "evaluation": "engine", "serving": "app"}
TOP = ("ovseg_ray.cli", "ovseg_ray.client", "ovseg_ray.workflows")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import statement of ``path`` (or ``text`` as if it were
    there), nested ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # "from . import x" imports the module x when it is one
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()]
    return found


def layer(module: str) -> str:
    if module.startswith(TOP):
        return "top"
    if module == "ovseg_ray.raycluster":
        return "ray helpers"
    for capability in CAPABILITIES:
        if module == f"ovseg_ray.{capability}" or module.startswith(f"ovseg_ray.{capability}."):
            return capability
    return "library"


def violations(path: Path, text: str | None = None) -> list[str]:
    """Why each of ``path``'s imports breaks the layering, as ``file:line imports X: reason``."""
    source = module_name(path)
    where = layer(source)
    found = []
    for line, target in imports(path, text):
        is_ray = target == "ray" or target.startswith("ray.")
        own = layer(target) if target.startswith("ovseg_ray") else None
        reason = None
        if where == "library" and is_ray:
            reason = "the library never imports Ray"
        elif where == "library" and own not in (None, "library"):
            reason = f"the library never imports from {own}"
        elif where == "ray helpers" and own not in (None, "library", "ray helpers"):
            reason = f"the shared Ray helpers never import from {own}"
        elif where in CAPABILITIES:
            if own in CAPABILITIES and own != where:
                reason = f"{where} never imports another capability ({own})"
            elif own == "top":
                reason = f"{where} never imports the command line"
            elif (is_ray or own == "ray helpers") and source != f"ovseg_ray.{where}.{RAY_MODULES[where]}":
                reason = f"only {where}/{RAY_MODULES[where]}.py, the Ray module of {where}, touches Ray"
        if reason:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}: {reason}")
    return found


def test_imports_run_downwards():
    problems = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_each_kind_of_violation_is_named():
    """The check itself, on code it is shown as if it stood at a given place."""
    def check(place: str, code: str) -> list[str]:
        return violations(PACKAGE / place, code)

    assert check("models/probe.py", "import torch\nimport ray\n") == [
        "ovseg_ray/models/probe.py:2 imports ray: the library never imports Ray"]
    assert check("inference.py", "def f():\n    from .mining import nouns\n") == [
        "ovseg_ray/inference.py:2 imports ovseg_ray.mining: the library never imports from mining",
        "ovseg_ray/inference.py:2 imports ovseg_ray.mining.nouns: the library never imports from mining"]
    assert check("training/config.py", "from ..data.pair_store import OutputLayout\n") == []
    assert check("training/config.py", "from ..mining.pipeline import mine_pairs\n") == [
        "ovseg_ray/training/config.py:1 imports ovseg_ray.mining.pipeline: training never imports another "
        "capability (mining)"]
    assert check("mining/stages.py", "from ..raycluster import init_ray\n") == [
        "ovseg_ray/mining/stages.py:1 imports ovseg_ray.raycluster: only mining/pipeline.py, the Ray module "
        "of mining, touches Ray"]
    assert check("mining/pipeline.py", "import ray.data\nfrom ..raycluster import init_ray\n") == []


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_capability_has_its_ray_module(capability):
    ray_module = PACKAGE / capability / f"{RAY_MODULES[capability]}.py"
    assert any(target == "ray" or target.startswith("ray.") for _, target in imports(ray_module))


def test_modules_stay_readable_in_one_sitting():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
