"""The import structure: launch -> tasks -> engine, never back, and no import circles.

Read from the source with `ast` (nothing is imported), counting imports inside functions too: a lazy import
still ties two modules together. `from pkg import name` counts as importing pkg (its __init__ runs first) and
pkg.name when that is a module.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("engine", "tasks", "launch")  # each may import only those before it


def _modules() -> dict[str, str]:
    found = {}
    for top in LAYERS:
        for folder, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules: dict) -> set[str]:
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` runs pkg/__init__.py before sub: that is an import of pkg too.
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    return {t for t in targets if t in modules and t != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def test_layers_import_only_downwards():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
             if LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])]
    assert not wrong, wrong


def test_no_import_circles():
    graph = _graph()
    state, circles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_every_task_lives_in_its_own_package():
    for package in ("classification", "squad", "ner", "encoders"):
        init = os.path.join(REPO, "tasks", package, "__init__.py")
        assert ast.get_docstring(ast.parse(open(init, encoding="utf-8").read())), f"{init} says what lives where"
    flat = sorted(n for n in os.listdir(os.path.join(REPO, "tasks")) if n.endswith(".py"))
    assert flat == ["__init__.py", "options.py", "registry.py", "serving.py", "textfiles.py"], flat


def test_modules_stay_small():
    big = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 400}
    assert not big, f"modules over 400 lines: {big}"


def test_the_wheel_holds_every_module_and_the_kernel_source(tmp_path):
    """`pip install .` (not editable) must ship every package, the subpackages included, and our ops' C++ sources."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    for name in LAYERS:
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "setup.py"), source / "setup.py")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").iterdir()
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {os.path.relpath(path, REPO).replace(os.sep, "/") for path in _modules().values()}
    assert expected - shipped == set()
    assert "engine/adamw_kernel.cc" in shipped and "engine/dropout_kernel.cc" in shipped
