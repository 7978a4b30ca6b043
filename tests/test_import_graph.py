"""The package's import graph holds its layers (docs/architecture.md, "Layers"), folder to folder and module to
module: every module imports alone; no module imports one of a higher layer; there is no import cycle between
modules nor between folders; imports inside functions count too."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "customshift_jax"
ROOT = PACKAGE.name

# Lowest first, by folder (or top-level module) of the package. A module may import its own folder's layer or lower
# ones, never a higher one; two folders of one layer may import one way only (no folder cycle).
LAYERS: dict[str, int] = {
    "numerics": 0, "kernels": 0, "parallel": 0, "tree_paths": 0,
    "models": 1,
    "sampling": 2,
    "customshift": 3,
    "io": 4,
    "text": 5,
    "reference": 6, "pipeline": 6, "customshift_pipeline": 6, "testing": 6,
    "train": 7, "crosscheck": 7,
    "toyworld": 8, "eval": 8, "plan": 8,
    "cli": 9,
    ROOT: 10,  # the package's own __init__
}


def module_names() -> list[str]:
    """Every module of the package (packages by their dotted name)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def folder(module: str) -> str:
    """The folder (or top-level module) of the package a module belongs to: `customshift_jax.io.images` -> `io`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    return LAYERS[folder(module)]


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


def module_graph() -> dict[str, set[str]]:
    known = set(module_names())
    return {m: imports_of(m, known) for m in known}


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The folder-to-folder edges of a module graph (imports inside one folder left out)."""
    out: dict[str, set[str]] = {folder(m): set() for m in graph}
    for m, deps in graph.items():
        out[folder(m)].update(folder(d) for d in deps if folder(d) != folder(m))
    return out


def upward_edges(graph: dict[str, set[str]], layer_of=layer) -> list[str]:
    """Every edge of `graph` from a lower layer to a higher one, as a readable line."""
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: Tarjan's strongly connected components of more than one node."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
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


def test_every_folder_has_a_layer():
    missing = sorted({folder(m) for m in module_names()} - set(LAYERS))
    assert not missing, f"folders with no layer in LAYERS (and docs/architecture.md): {missing}"


def test_no_upward_import_and_no_cycle_between_modules():
    graph = module_graph()
    assert not upward_edges(graph), "\n".join(upward_edges(graph))
    assert not cycles(graph), cycles(graph)


def test_folders_are_layered_and_import_one_way():
    folders = folder_graph(module_graph())
    assert not upward_edges(folders, LAYERS.get), "\n".join(upward_edges(folders, LAYERS.get))
    assert not cycles(folders), cycles(folders)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_data_preparation_apart_from_training():
    """`customshift prepare` (encode pairs into shards) and `customshift train` share only the shard format
    (`train.data`, `train.shard_writer`): neither side imports the other."""
    graph = module_graph()
    preparing = {f"{ROOT}.train.{m}" for m in ("prepare", "prepare_out", "subjects200k")}
    training = {f"{ROOT}.train.{m}" for m in ("step", "base_step", "loop", "optim", "samples")}
    assert all(m in graph for m in preparing | training)
    crossing = sorted(f"{a} reaches {b}" for src, dst in ((preparing, training), (training, preparing))
                      for a in src for b in reachable(graph, a) & dst)
    assert not crossing, "\n".join(crossing)


def test_the_checkers_catch_an_upward_edge_and_a_cycle():
    """The checkers above fail on a bad graph (so they cannot pass on anything), and the walk finds real edges."""
    base, method = f"{ROOT}.models.mmdit.model", f"{ROOT}.customshift.cads"
    io, text = f"{ROOT}.io.checkpoint", f"{ROOT}.text.encode"
    upward = {base: {method}, method: set()}  # the base model importing the method
    assert upward_edges(upward) == [f"{base} (layer 1) imports {method} (layer 3)"]
    assert upward_edges({method: {base}, base: set()}) == []
    assert cycles({base: {method}, method: {base}}) == [sorted([base, method])]
    assert cycles({method: {base}, base: set()}) == []
    # two folders importing each other through different modules: no module cycle, but a folder cycle
    both_ways = {io: {f"{ROOT}.text.cache"}, f"{ROOT}.text.cache": set(), text: {f"{ROOT}.io.safe_files"},
                 f"{ROOT}.io.safe_files": set()}
    assert cycles(both_ways) == []
    assert cycles(folder_graph(both_ways)) == [["io", "text"]]
    assert upward_edges(folder_graph(both_ways), LAYERS.get) == ["io (layer 4) imports text (layer 5)"]
    # and the real graph has the edges the layers speak of
    graph = module_graph()
    assert f"{ROOT}.models.mmdit.model" in graph[f"{ROOT}.customshift.branches"]
    assert "models" in folder_graph(graph)["customshift"]
    assert f"{ROOT}.train.data" in reachable(graph, f"{ROOT}.train.loop")
