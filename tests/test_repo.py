"""Repository invariants: CI runs the README's test command, lint is clean, layering holds."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    ci = _command_lines((ROOT / ".ci/run").read_text())
    readme = _command_lines((ROOT / "README.md").read_text())
    assert ci, ".ci/run has no setup-and-test command"
    assert ci[0] in readme, "the command .ci/run executes must appear verbatim in README.md"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    proc = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layering():
    """Passes never import backends or the frontend; backends never import the frontend;
    nothing imports torch_mlir at `import flagtree` time (it is checked in a subprocess)."""
    rules = {
        "passes": re.compile(r"^flagtree\.(backends|frontend|cli)"),
        "backends": re.compile(r"^flagtree\.(frontend|cli)"),
        "flagtree/ir": re.compile(r"^flagtree\.(passes|backends|frontend|cli)"),
    }
    for folder, forbidden in rules.items():
        for path in (ROOT / folder).rglob("*.py"):
            bad = sorted(name for name in _imports(path) if forbidden.match(name))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_import_flagtree_is_light():
    code = (
        "import sys, flagtree, flagtree.ir\n"
        "assert 'torch_mlir' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
