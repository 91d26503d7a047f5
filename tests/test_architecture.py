"""The layer rules of docs/ARCHITECTURE.md, checked on every `make test`:

- the import-linter contracts in pyproject.toml ([tool.importlinter]): layers point one way, losses
  and ops import only torch, data knows nothing of training, stages never import the CLI, the lab
  and the labelling app use the public API, no cycles between siblings;
- no module imports another module's underscore name (a private helper moves down a layer or
  becomes public instead).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "prefalign"


def test_import_contracts_hold():
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, \
        "an import contract is broken: run `lint-imports` in the project root for the details"


def private_imports(path: Path) -> list[str]:
    """'file:line name' for every `from prefalign.x import _name` / `import prefalign.x._y` in path."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefalign"):
            names = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            parts = [p for p in node.module.split(".") if p.startswith("_") and p != "__main__"]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names + parts]
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                      if a.name.startswith("prefalign") and any(p.startswith("_") and p != "__main__"
                                                                for p in a.name.split("."))]
    return found


def test_private_imports_detected():
    import tempfile
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        f = Path(d) / "m.py"
        f.write_text("from prefalign.train.loop import _Meter, fit\nimport prefalign._hidden\n"
                     "from prefalign import __version__\n")
        assert [x.split()[-1] for x in private_imports(f)] == ["_Meter", "prefalign._hidden"]


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "examples"])
def test_no_module_imports_another_modules_private_names(folder):
    found = [hit for path in sorted((ROOT / folder).rglob("*.py")) for hit in private_imports(path)]
    assert not found, "imports of underscore names from other modules:\n" + "\n".join(found)
