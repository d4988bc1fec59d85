"""Export of a trained stage-1 tokenizer to files other runtimes read (``vqvae export``), one
writer per format: ONNX (:mod:`vqvae.export.onnx`), diffusers (:mod:`vqvae.store.diffusers`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Literal, get_args

from ..errors import ConfigError, DataError
from ..fileio import fsync_dir
from ..store import checkpoint as ckpt
from ..store.diffusers import export_diffusers
from .onnx import write_onnx

ExportFormat = Literal["onnx", "diffusers"]

# A writer fills an empty folder from a stage-1 checkpoint folder: writer(checkpoint, folder,
# device, report), ``report`` taking one short line at a time (the CLI prints them).
# ``export_run`` resolves the run, gives the writer a temporary folder beside the output and
# moves its files into place only when the writer returns, so a failed export leaves nothing.
Writer = Callable[[Path, Path, str, Callable[[str], None]], None]


def write_diffusers(checkpoint: Path, folder: Path, device: str = "cpu",
                    report: Callable[[str], None] = print) -> None:
    """diffusers' VQModel folder (config.json and its weights) of a vqgan checkpoint; a model
    VQModel cannot express is a ConfigError naming the part."""
    export_diffusers(ckpt.load_autoencoder(checkpoint), folder)


# The format name -> its writer. Another format adds its name to ``ExportFormat`` and its
# writer here.
FORMATS: dict[ExportFormat, Writer] = {
    "onnx": write_onnx,
    "diffusers": write_diffusers,
}


def export_run(run: str | Path, fmt: ExportFormat, out: str | Path, device: str = "cpu",
               report: Callable[[str], None] | None = None) -> Path:
    """Write the stage-1 model of ``run`` (a run or checkpoint folder) as ``fmt`` into the folder
    ``out`` (created, or its files of the same names replaced); returns ``out``. ``report``
    receives short lines: a format's checks (ONNX: its parity with PyTorch), the files written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (choose from "
                          f"{', '.join(get_args(ExportFormat))})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: --out names the folder to write the export into")
    checkpoint = ckpt.resolve(run)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        report = report or (lambda line: None)
        FORMATS[fmt](checkpoint, tmp, device, report)
        names = sorted(path.name for path in tmp.iterdir())
        _move_into(tmp, out)
        for name in names:
            report(f"wrote {out / name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into(tmp: Path, out: Path) -> None:
    """``tmp``'s files into ``out``: one rename when ``out`` is new, else one per file."""
    if not out.exists():
        os.replace(tmp, out)
    else:
        for path in sorted(tmp.iterdir()):
            if (out / path.name).is_dir():
                shutil.rmtree(out / path.name)
            os.replace(path, out / path.name)
    fsync_dir(out)
    fsync_dir(out.parent)
