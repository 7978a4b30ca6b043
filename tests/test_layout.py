"""The tests are laid out like the package: each folder under tests/ is named after a subpackage of customshift_jax,
and only tests of a top-level module (`test_<module>.py`) or of the package as a whole (its import graph, README,
the pipeline, the tiny SD3 folder) sit at the top."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "customshift_jax"
WHOLE_PACKAGE = {"test_import_graph.py", "test_layout.py", "test_pipeline_api.py", "test_readme.py",
                 "test_tiny_pipeline.py"}


def misplaced(tests: Path, package: Path, whole_package: set[str]) -> list[str]:
    """Test folders with no subpackage of that name, and test files at the top that test neither a top-level
    module nor the whole package."""
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    top_level = whole_package | {f"test_{p.stem}.py" for p in package.glob("*.py") if p.stem != "__init__"}
    folders = [p for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    bad = [f"tests/{p.name}/ (no customshift_jax.{p.name})" for p in folders if p.name not in subpackages]
    bad += [f"tests/{p.name} (belongs in the folder of the subpackage it tests)" for p in tests.glob("test_*.py")
            if p.name not in top_level]
    return sorted(bad)


def test_every_test_folder_names_a_subpackage():
    assert misplaced(TESTS, PACKAGE, WHOLE_PACKAGE) == []


def test_the_checker_reports_a_stray_folder_and_a_stray_file(tmp_path):
    (tmp_path / "pkg" / "io").mkdir(parents=True)
    (tmp_path / "pkg" / "io" / "__init__.py").write_text("")
    (tmp_path / "tests" / "io").mkdir(parents=True)
    (tmp_path / "tests" / "widgets").mkdir()
    (tmp_path / "tests" / "test_loose.py").write_text("")
    (tmp_path / "tests" / "test_readme.py").write_text("")
    (tmp_path / "pkg" / "numerics.py").write_text("")
    (tmp_path / "tests" / "test_numerics.py").write_text("")
    assert misplaced(tmp_path / "tests", tmp_path / "pkg", {"test_readme.py"}) == [
        "tests/test_loose.py (belongs in the folder of the subpackage it tests)",
        "tests/widgets/ (no customshift_jax.widgets)"]


def private_uses(source: str, package: str = "customshift_jax") -> list[str]:
    """Private names of the package a test file reaches: `from pkg.x import _name`, and `m._name` where `m` is a
    module of the package (`import pkg.x as m`, `from pkg import x`). Tests test what a user can call."""
    import ast

    tree = ast.parse(source)
    modules, found = set(), []
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package:
            found += [f"from {node.module} import {a.name}" for a in node.names if private(a.name)]
            folder = PACKAGE.parent / node.module.replace(".", "/")
            modules |= {a.asname or a.name for a in node.names if not private(a.name)
                        and ((folder / f"{a.name}.py").is_file() or (folder / a.name / "__init__.py").is_file())}
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] == package}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and private(node.attr)):
            found.append(f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def test_tests_reach_no_private_function():
    bad = {str(p.relative_to(TESTS)): private_uses(p.read_text()) for p in sorted(TESTS.rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_private_use_checker_sees_both_forms():
    source = ("from customshift_jax.train.loop import _secret, public\n"
              "from customshift_jax.plan import hlo\n"
              "import customshift_jax.train.loop as loop\n"
              "hlo._parse('x'); loop._step(); hlo.parse('x'); hlo.__name__\n")
    assert private_uses(source) == ["from customshift_jax.train.loop import _secret", "hlo._parse", "loop._step"]
