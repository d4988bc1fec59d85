"""Load a script of benchmarks/ or scripts/ (folders that are not packages) as a module."""

import importlib.util
from pathlib import Path


def load_script(relative: str):
    path = Path(__file__).parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
