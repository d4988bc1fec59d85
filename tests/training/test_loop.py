"""The shared training loop (vqvae.training.loop) and run folder (vqvae.store.runs), with a
stand-in stage."""

import json
import time

import pytest
import torch

from vqvae.store import checkpoint as ckpt
from vqvae.training import loggers, loop
from vqvae.store import runs
from vqvae.config import LoopConfig, RunConfig, from_dict, run_config, to_dict
from vqvae.distributed import Runtime

CPU = Runtime(torch.device("cpu"))


class CountingStage:
    """A stage whose 'loss' is the step number; counts saves."""

    halt = None  # its data never goes bad

    def __init__(self, nan_at: int | None = None):
        self.nan_at, self.saves = nan_at, []

    def step(self, step: int) -> dict[str, torch.Tensor]:
        value = float("nan") if step + 1 == self.nan_at else float(step)
        return {"loss": torch.tensor(value), "twice": torch.tensor(2.0 * value)}

    def describe(self, step, means):
        return {"half": means["loss"] / 2}

    def save(self, step):
        self.saves.append(step)
        return loop.Saved({"score": float(step)}, {})

    def postfix(self, record, metrics):
        return {"loss": f"{record['loss']:.1f}"}


class Recorder(loggers.Logger):
    def __init__(self):
        self.lines, self.evals = [], []

    def train(self, record):
        self.lines.append(record)

    def eval(self, step, metrics):
        self.evals.append((step, metrics))


def test_fit_logs_window_means_saves_every_and_at_the_end():
    stage, logger = CountingStage(), Recorder()
    step, signum = loop.fit(stage, LoopConfig(steps=25, every=10), CPU, 0, logger, "t", False)
    assert step == 25 and signum is None and stage.saves == [10, 20, 25]
    assert [r["step"] for r in logger.lines] == [10, 20, 25]
    first = logger.lines[0]  # steps 0..9: mean 4.5
    assert first["loss"] == pytest.approx(4.5) and first["twice"] == pytest.approx(9.0)
    assert first["half"] == pytest.approx(2.25) and first["steps_per_s"] > 0
    assert logger.lines[-1]["loss"] == pytest.approx(22.0)  # steps 20..24
    assert [s for s, _ in logger.evals] == [10, 20, 25]


def test_fit_resumes_from_start():
    stage, logger = CountingStage(), Recorder()
    assert loop.fit(stage, LoopConfig(steps=30, every=10), CPU, 20, logger, "t", False).step == 30
    assert stage.saves == [30] and logger.lines[0]["loss"] == pytest.approx(24.5)


def test_fit_reads_losses_only_at_log_lines(monkeypatch):
    """No host sync per step: the loss terms are summed on the device and read once a line."""
    reads = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: (
            reads.append(_n), _real(self, *a, **k))[1])
    loop.fit(CountingStage(), LoopConfig(steps=30, every=1000), CPU, 0, Recorder(), "t", False)
    assert reads.count("tolist") == 3 and "item" not in reads and "__float__" not in reads


def test_a_non_finite_loss_stops_before_the_save():
    stage = CountingStage(nan_at=15)
    with pytest.raises(runs.NonFiniteError, match="by step 20.*step 10 stays the latest"):
        loop.fit(stage, LoopConfig(steps=40, every=10), CPU, 0, Recorder(), "t", False)
    assert stage.saves == [10]
    # a save between log lines checks the steps since the last line first
    stage = CountingStage(nan_at=12)
    with pytest.raises(runs.NonFiniteError, match="by step 13.*no checkpoint was written"):
        loop.fit(stage, LoopConfig(steps=40, every=13), CPU, 0, Recorder(), "t", False)
    assert stage.saves == []


def test_a_minutes_budget_counts_the_seconds_spent_before_a_resume(monkeypatch):
    """A resumed run's clock starts at the seconds its checkpoint saved: it stops when the run's
    budget is spent, not another whole budget later, and its saves record the run's total."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    class Ticking(CountingStage):  # each step takes one second
        def step(self, step):
            now[0] += 1.0
            return super().step(step)

    clock = loop.RunClock(10**6, 1.0, spent=55.0)  # 55 of its 60 seconds spent
    stage = Ticking()
    cfg = LoopConfig(steps=10**6, every=1000, minutes=1.0)
    step, _ = loop.fit(stage, cfg, CPU, 500, Recorder(), "t", False, clock)
    assert step == 505 and stage.saves == [505] and clock.seconds == pytest.approx(60.0)
    assert clock.progress(step) == 1.0
    with pytest.raises(ValueError, match="spent its --minutes 1 budget"):
        runs.check_steps(step, 10**6, clock.seconds, 1.0)
    runs.check_steps(step, 10**6, clock.seconds, 2.0)  # a larger budget trains on


def test_projected_total_is_the_binding_budget():
    assert loop.projected_total(0, 100, 0, 0.0, 60.0) == 100  # no rate yet: the step budget
    assert loop.projected_total(10, 10**6, 10, 1.0, 60.0) == 610  # 10 steps/s for 60 s more
    assert loop.projected_total(10, 100, 10, 1.0, 60.0) == 100  # steps bind first
    assert loop.projected_total(50, 10**6, 50, 5.0, -1.0) == 50  # out of time


def test_progress_under_a_deadline_counts_towards_it():
    bar = loop.Progress(0, 10**6, time.monotonic() + 60.0, "t", enabled=False)
    time.sleep(0.05)
    bar.update(5)  # ~100 steps/s for 60 s: a total near 6,000, not a million
    assert 5 < bar.bar.total < 10**5
    plain = loop.Progress(0, 500, None, "t", enabled=False)
    plain.update(1)
    assert plain.bar.total == 500


# --- the run folder ----------------------------------------------------------------------------


def test_run_config_is_tagged_and_found_from_its_checkpoints(tmp_path):
    cfg = run_config("seed", train={"steps": 3})
    run = tmp_path / "run"
    with runs.opened(run, False, CPU):
        runs.prepare_run(run, ckpt.VQVAE_KIND, cfg, start=0)
        with pytest.raises(runs.RunLockedError, match="in use by pid"):
            with runs.opened(run, True, CPU):
                pass
    raw = json.loads((run / "config.json").read_text())
    assert raw["kind"] == "vqvae-run" and raw["format"] == ckpt.FORMAT
    step_dir = run / "checkpoints" / "step-0000003"
    step_dir.mkdir(parents=True)
    ckpt.write_config(step_dir / "config.json", "vqvae", to_dict(cfg.model))
    for path in (run, run / "checkpoints", step_dir):
        assert runs.find_run(path) == run
        assert runs.read_run_config(path, ckpt.VQVAE_KIND) == cfg
    with pytest.raises(ckpt.CheckpointError, match="is a vqvae run folder, not a prior one"):
        runs.read_run_config(step_dir, ckpt.PRIOR_KIND)
    alone = tmp_path / "copied"
    alone.mkdir()
    (alone / "config.json").write_text((step_dir / "config.json").read_text())
    (alone / "model.safetensors").write_bytes(b"")
    assert runs.find_run(alone) is None
    with pytest.raises(ckpt.CheckpointError, match="not a vqvae run folder"):
        runs.read_run_config(alone, ckpt.VQVAE_KIND)
    with pytest.raises(FileExistsError, match="--resume"):
        with runs.opened(run, False, CPU):
            pass


def test_untagged_run_configs_from_before_still_read(tmp_path):
    cfg = run_config("default", train={"eval_count": 77})
    old = to_dict(cfg)
    old["train"]["eval_images"] = old["train"].pop("eval_count")  # the old name, no tag
    del old["train"]["tensorboard"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert runs.read_run_config(tmp_path, ckpt.VQVAE_KIND) == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_tensorboard_logger_writes_scalars_and_pictures(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    picture = tmp_path / "p.png"
    Image.new("L", (6, 4), 128).save(picture)
    with loggers.open_logger(tmp_path, LoopConfig(tensorboard=True), 0, CPU) as logger:
        for step in (10, 20):
            logger.train({"step": step, "loss": 1.0 / step})
        logger.eval(20, {"psnr": 21.5, "grids": 3})
        logger.pictures(20, {"sample": picture})
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20]
    assert events.Scalars("test/psnr")[0].value == pytest.approx(21.5)
    image = events.Images("pictures/sample")[0]
    assert (image.step, image.width, image.height) == (20, 6, 4)
    assert (tmp_path / "train.jsonl").exists()  # the jsonl logger runs beside it
