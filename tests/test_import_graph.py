"""The package's import graph: every module imports alone, no module imports one of a higher layer, and there
is no import cycle, counting the imports inside functions too (docs/architecture.md, "Layers")."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "customshift_jax"

# Lowest first. A module may import its own layer or lower ones, never a higher one. Longest prefix wins.
LAYERS: dict[str, int] = {
    "customshift_jax.numerics": 0, "customshift_jax.io.safetensors": 0, "customshift_jax.io.images": 0,
    "customshift_jax.io.safe_files": 0, "customshift_jax.kernels": 0, "customshift_jax.tree_paths": 0,
    "customshift_jax.models": 1,
    "customshift_jax.parallel": 2, "customshift_jax.io.checkpoint": 2, "customshift_jax.io.config_check": 2,
    "customshift_jax.io.integrity": 2, "customshift_jax.io.leftovers": 2,
    "customshift_jax.sampling": 3, "customshift_jax.text": 3,
    "customshift_jax.customshift": 4,
    "customshift_jax.io": 5,
    "customshift_jax.reference": 6, "customshift_jax.pipeline": 6, "customshift_jax.testing": 6,
    "customshift_jax.customshift_pipeline": 6,
    "customshift_jax.train": 7, "customshift_jax.crosscheck": 7,
    "customshift_jax.toyworld": 8, "customshift_jax.eval": 8, "customshift_jax.plan": 8,
    "customshift_jax.cli": 9,
    "customshift_jax": 10,
}


def module_names() -> list[str]:
    """Every module of the package (packages by their dotted name)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports_of(module: str, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its file (top level or inside functions)."""
    path = PACKAGE.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    found.discard(module)
    return found


def test_every_module_imports_alone():
    """Each module imports in a fresh module table (jax and the rest stay loaded, so this is quick)."""
    script = (
        "import importlib, sys\n"
        f"mods = {module_names()!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'customshift_jax' or k.startswith('customshift_jax.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_no_upward_import_and_no_cycle():
    known = set(module_names())
    graph = {m: imports_of(m, known) for m in known}
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not upward, "\n".join(upward)
    # Tarjan's strongly connected components: any with more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import():
    """The graph walk finds a real edge (so the test above cannot pass on an empty graph)."""
    known = set(module_names())
    assert "customshift_jax.models.mmdit.model" in imports_of("customshift_jax.customshift.branches", known)
    assert layer("customshift_jax.customshift.cads") > layer("customshift_jax.models.mmdit.model")
