"""Where the training loop's numbers and pictures go: ``train.jsonl`` and ``metrics.jsonl`` in the
run folder (with the curves redrawn after each evaluation), TensorBoard, or nowhere (other ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import LoopConfig
from ..distributed import Runtime
from ..errors import ConfigError
from ..store.runs import METRICS_LOG, TENSORBOARD_DIR, TRAIN_LOG, append_jsonl, read_jsonl


class Logger:
    """The loop's logging seam: training lines, held-out metrics, pictures. This base class drops
    everything (ranks other than 0); :class:`JsonlLogger` and :class:`TensorBoardLogger` write."""

    def train(self, record: dict[str, float]) -> None:
        pass

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class JsonlLogger(Logger):
    """``train.jsonl`` and ``metrics.jsonl`` in the run folder, and ``curves`` (a function of
    both logs, e.g. a plot) redrawn after every evaluation."""

    run_dir: Path
    curves: Callable[[list[dict], list[dict]], Any] | None = None

    def train(self, record: dict[str, float]) -> None:
        append_jsonl(self.run_dir / TRAIN_LOG, record)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.run_dir / METRICS_LOG, {"step": step, "split": "test", **metrics})
        if self.curves is not None:
            self.curves(read_jsonl(self.run_dir / TRAIN_LOG),
                        read_jsonl(self.run_dir / METRICS_LOG))


def check_loggers(loop: LoopConfig) -> None:
    """Fail before a run folder is made when a logger asked for cannot be used."""
    if loop.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                              "'vqvae[tensorboard]'") from None


class TensorBoardLogger(Logger):
    """Scalars under ``train/`` and ``test/`` and every picture of a checkpoint under
    ``pictures/``, in ``RUN/tensorboard``; a resume drops the events written after its step."""

    def __init__(self, run_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR),
                                    purge_step=start + 1 if start else None)

    def train(self, record: dict[str, float]) -> None:
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"test/{name}", value, step)

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for name, path in paths.items():
            with Image.open(path) as image:
                self.writer.add_image(f"pictures/{name}", np.asarray(image.convert("RGB")), step,
                                      dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


@dataclass
class Loggers(Logger):
    """Several loggers as one."""

    loggers: list[Logger] = field(default_factory=list)

    def train(self, record: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.train(record)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.eval(step, metrics)

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        for logger in self.loggers:
            logger.pictures(step, paths)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_logger(run_dir: Path, loop: LoopConfig, start: int, runtime: Runtime,
                curves: Callable[[list[dict], list[dict]], Any] | None = None) -> Logger:
    """The run's loggers on the main process (jsonl, and TensorBoard with ``loop.tensorboard``);
    a logger that drops everything on the other ranks."""
    if not runtime.is_main:
        return Logger()
    loggers: list[Logger] = [JsonlLogger(run_dir, curves)]
    if loop.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, start))
    return Loggers(loggers)
