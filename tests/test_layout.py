"""The package's structure: modules import each other without cycles, stage 2 never imports stage
1's trainer, and the CLI and models stay free of what belongs elsewhere."""

import ast
from pathlib import Path

import vqvae

PACKAGE = Path(vqvae.__file__).parent


def internal_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import``, ``from . import x``)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_imports_form_layers_without_cycles():
    graph = internal_imports()
    order, done, visiting = [], set(), set()

    def visit(module, trail):
        assert module not in visiting, "import cycle: " + " -> ".join([*trail, module])
        if module in done:
            return
        visiting.add(module)
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*trail, module])
        visiting.discard(module)
        done.add(module)
        order.append(module)

    for module in sorted(graph):
        if module != "__init__":
            visit(module, [])
    assert {"config", "runs", "loop", "train", "train_prior", "cli"} <= set(order)


def test_stage_boundaries():
    graph = internal_imports()
    assert "train" not in graph["train_prior"]  # stage 2 takes nothing from stage 1's trainer
    assert "train" not in graph["loop"] | graph["runs"]  # the shared loop serves both stages
    # Models are pure modules: no run folders, checkpoints, logging or CLI inside.
    for model in ("autoencoder", "prior", "quantize", "fsq", "perceptual"):
        assert not graph[model] & {"checkpoint", "runs", "loop", "cli", "plots", "sample"}, model
    # Nothing below the CLI imports it.
    assert not any("cli" in deps for name, deps in graph.items() if name != "__main__")
