"""Resolve run_train.sh's MODEL and CONFIG to the module that defines the config.

CONFIG is looked up in our root config_registry.py first, then in torchtitan's registry for
MODEL. Both are read with ``ast``, without importing torch, since this runs before every
launch. Usage: ``python -m torchtitan_ext.launch MODEL CONFIG`` prints the module name for
``--module``; an unknown CONFIG exits with status 2 and lists the available ones.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_REGISTRY = "config_registry"


def config_functions(path: Path) -> list[str]:
    """Public top-level function names of a config registry file, in file order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    ]


def torchtitan_registry(model: str) -> Path | None:
    """torchtitan's config_registry.py for a model name (e.g. llama3), if it has one."""
    spec = importlib.util.find_spec("torchtitan")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(spec.submodule_search_locations[0])
    for folder in ("models", "experiments"):
        path = base / folder / model / "config_registry.py"
        if path.is_file():
            return path
    return None


def resolve(model: str, config: str) -> str:
    """The ``--module`` value that defines CONFIG; ValueError listing choices otherwise."""
    ours = config_functions(REPO_ROOT / f"{OUR_REGISTRY}.py")
    if config in ours:
        return OUR_REGISTRY
    theirs_path = torchtitan_registry(model)
    theirs = config_functions(theirs_path) if theirs_path else []
    if config in theirs:
        return model
    lines = [f"Unknown CONFIG={config!r}.", f"torchtitan_ext configs: {', '.join(ours)}"]
    if theirs_path:
        lines.append(f"torchtitan configs for MODEL={model}: {', '.join(theirs)}")
    else:
        lines.append(f"torchtitan has no model named MODEL={model!r}")
    raise ValueError("\n".join(lines))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m torchtitan_ext.launch MODEL CONFIG", file=sys.stderr)
        return 2
    try:
        print(resolve(*argv))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
