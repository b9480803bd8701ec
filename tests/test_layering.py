"""The package only looks down: `cli` registers the commands, the commands use `flags` and the
layers below it, and nothing below a command imports a command (no import circles)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "vhr_edge"
COMMANDS = {"vhr_edge.cli", "vhr_edge.eval.cli", "vhr_edge.eval.compare", "vhr_edge.eval.trace", "vhr_edge.calibrate"}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every vhr_edge module a file imports, at top level or inside functions."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n.startswith("vhr_edge"))
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}


def test_no_module_below_the_commands_imports_a_command():
    g = _graph()
    for mod, deps in g.items():
        if mod == "vhr_edge.cli":
            continue
        bad = deps & COMMANDS
        assert not bad, f"{mod} imports the command module(s) {sorted(bad)}"


def test_the_import_graph_has_no_circle():
    g = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if d.endswith("__init__") or d in ("vhr_edge",):
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [m, d]))
            if not state.get(d):
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if not state.get(m) and m != "vhr_edge":
            visit(m, [])


def test_usage_errors_name_the_command_once():
    for argv, want in ((["--bogus"], "(see vhr-edge --help)"),
                       (["caption"], "(see vhr-edge caption --help)"),
                       (["eval", "chair", "--bogus"], "(see vhr-edge eval chair --help)")):
        r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith("vhr-edge: error: ") and line.endswith(want), line
