"""The package's structure: packages by kind in layers that import only downwards, no module
import cycles, stage 2 never imports stage 1's trainer, models stay pure, and the README's module
map lists every module."""

import ast
from pathlib import Path

import vqvae

PACKAGE = Path(vqvae.__file__).parent
README = PACKAGE.parents[1] / "README.md"

# The layers, bottom first: a module may import its own layer's and lower layers' modules only.
LAYERS = [
    {"errors", "fileio", "distributed", "precision"},  # core: no package imports but these
    {"config"},
    {"data", "models"},
    {"store"},
    {"evaluation", "generation", "report", "export", "codec"},
    {"training"},
    {"api", "options", "cli", "startup", "__init__", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    """``vqvae/models/prior.py`` -> ``models.prior``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``import from`` names (relative or ``vqvae.``-absolute)."""
    if node.level == 0:
        if not (node.module or "").startswith("vqvae"):
            return []
        base = (node.module or "").split(".")[1:]
    else:
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        if module == "__init__":
            here = []
        base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module
                                                      else [])
    if node.module:
        return [".".join(base) or "__init__"]
    return [".".join([*base, alias.name]) for alias in node.names]


def internal_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, module-level and inside functions."""
    graph = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for dep in resolve(me, path, node):
                    # ``from .config import X`` names a module; ``from . import __version__`` not
                    while dep and dep not in modules:
                        dep = dep.rpartition(".")[0]
                    if dep:
                        deps.add(dep)
        graph[me] = deps - {me}
    return graph


def unit(module: str) -> str:
    return module.split(".")[0]


def test_every_module_is_in_a_layer():
    assert {unit(m) for m in internal_imports()} <= set(LAYER)


def test_packages_import_only_downwards():
    wrong = [f"{m} ({LAYER[unit(m)]}) imports {d} ({LAYER[unit(d)]})"
             for m, deps in internal_imports().items() for d in deps
             if m != "__init__" and LAYER[unit(d)] > LAYER[unit(m)]]
    assert not wrong, wrong


def test_imports_have_no_cycles():
    graph = internal_imports()
    done, visiting = set(), set()

    def visit(module, trail):
        assert module not in visiting, "import cycle: " + " -> ".join([*trail, module])
        if module in done:
            return
        visiting.add(module)
        for dep in sorted(graph.get(module, ())):
            if not (module.startswith(dep + ".") or dep == "__init__"):  # a package's own parts
                visit(dep, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_stage_boundaries():
    graph = internal_imports()
    assert "training.stage1" not in graph["training.stage2"]  # nothing from stage 1's trainer
    for shared in ("training.loop", "training.driver", "store.runs"):
        if shared in graph:
            assert not graph[shared] & {"training.stage1", "training.stage2"}, shared
    # Models are pure modules: nothing from run folders, checkpoints, training or the CLI.
    for model in (m for m in graph if unit(m) == "models"):
        assert all(unit(d) in {"models", "config", "errors", "fileio", "distributed", "precision"}
                   for d in graph[model]), (model, graph[model])
    assert not any("cli" in deps for name, deps in graph.items() if name != "__main__")


def test_the_readme_module_map_lists_every_module():
    """Each package's row names its modules (``models/quantizers/vq.py`` as ``quantizers/vq.py``
    in the ``models/`` row)."""
    rows = {line.split("|")[1].strip(" `"): line for line in README.read_text().splitlines()
            if line.startswith("| ")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if path.name == "__init__.py" and len(parts) > 1:
            continue
        row = rows.get(parts[0] + "/" if len(parts) > 1 else "", "") or " ".join(
            line for key, line in rows.items() if key in ("core", "CLI"))
        if f"`{'/'.join(parts[1:] or parts)}`" not in row:
            missing.append("/".join(parts))
    assert not missing, f"README's module map misses {missing}"


def test_the_cli_is_a_table_over_public_functions():
    """Each command calls a function of ``vqvae.__all__``; the CLI itself builds no model, writes
    no file and picks no device."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not imported & {"torch", "json", "PIL", "numpy", "pick_device", "launch",
                           "write_json", "save_png", "plot_code_usage"}
    commands = [node for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")]
    assert len(commands) == 15
    for command in commands:
        called = {node.func.id for node in ast.walk(command)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert called & set(vqvae.__all__), f"{command.name} calls no public function"
