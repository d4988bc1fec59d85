"""Stage-1 training: the VQ-VAE loss, one training step, and what stage 1 brings to the run
driver (:func:`vqvae.training.driver.run`): its setup, pictures and held-out metrics.

Loss (the seed's): mse(x, x_rec) + mse(sg(z), e) + beta * mse(z, sg(e)), straight-through
estimator inside the quantizer (van den Oord et al. 2017, arXiv:1711.00937); ``--recon-loss l1``
puts mean |x - x_rec| (VQGAN's) in place of the first term, ``--freq-weight`` adds the focal
frequency loss (:mod:`vqvae.training.frequency`). Under torchrun each rank trains a
DistributedDataParallel copy on its slice of every global batch (a per-rank
:class:`~vqvae.data.sources.BatchStream`), evaluation is sharded, and I/O happens on rank 0 only.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from time import perf_counter
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..config import PRESETS, ReconLoss, RunConfig, TrainConfig
from ..data.images import Batch
from ..data.loader import train_batches
from ..data.sources import Splits, load_splits, to_float
from ..distributed import Runtime, any_rank, data_parallel, launch
from ..evaluation.metrics import CodeUsage, score_autoencoder
from ..evaluation.plots import plot_code_usage, plot_curves
from ..generation.grids import grid_pairs, interpolation_picture, reconstruction_pictures
from ..models.autoencoder import VQVAE, VQVAEOutput
from ..precision import autocast, loss_scaler
from ..store import checkpoint as ckpt
from ..store import runs
from ..store.checkpoint import VQVAE_KIND
from ..store.runs import TrainingState
from .adversarial import Sharpener
from .driver import RunResult, Scored, run
from .frequency import focal_frequency_loss
from .loggers import check_loggers
from .schedule import Phases, RunClock, Schedule

HEALTH = ("usage", "dead_codes", "perplexity")  # codebook health, logged over a window of steps


def vqvae_losses(x: torch.Tensor, out: VQVAEOutput, recon: ReconLoss = "mse",
                 freq_weight: float = 0.0, freq_alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss and its named terms: mse_x, mse_e = codebook, mse_z = commitment (the seed's),
    and l1_x, the mean absolute error, when ``recon`` is "l1" (then the loss's pixel term in
    place of mse_x, which is still logged so that curves compare across runs); with
    ``freq_weight`` > 0, freq_x, the focal frequency loss, added times that weight."""
    mse_x = F.mse_loss(out.reconstruction, x)
    q = out.quantized
    terms = {"mse_x": mse_x, "mse_e": q.codebook_loss, "mse_z": q.commitment_loss}
    if recon == "l1":
        terms["l1_x"] = F.l1_loss(out.reconstruction, x)
    loss = terms[f"{recon}_x"] + q.loss
    if freq_weight > 0:
        terms["freq_x"] = focal_frequency_loss(out.reconstruction, x, freq_alpha)
        loss = loss + freq_weight * terms["freq_x"]
    return {"loss": loss, **terms}


def load_run_config(path: str | Path) -> RunConfig:
    """The config of the stage-1 run folder holding ``path`` (the run or one of its checkpoints)."""
    return runs.read_run_config(path, VQVAE_KIND)


# A decoder fine-tune's default learning rate, as a share of the source run's: a fresh Adam at the
# run's own rate cost 1.5-2.5 dB on Fashion-MNIST, at a tenth ~0.5 dB with a lower distance
# (docs/tokenizer.md).
FINETUNE_LR_SCALE = 0.1


def finetune_config(source: str | Path, train: dict | None = None,
                    data: str | None = None) -> RunConfig:
    """The config of a decoder-only fine-tune of the stage-1 model at ``source`` (a run or
    checkpoint folder): its data (or the source ``data``) and model, its training options
    updated by ``train`` (the learning rate, unless given, :data:`FINETUNE_LR_SCALE` times its
    own), starting from its weights with the encoder and codebook frozen, so its codes stay those
    of ``source`` (and of the checkpoint ``source`` was itself fine-tuned from). A model outside
    a run folder (a copied checkpoint, a diffusers VQModel folder) needs ``data`` and starts
    from its architecture's preset's training options."""
    from ..generation.codes import codes_fingerprint, stage1_data

    directory = ckpt.resolve(source)
    if runs.find_run(source) is not None:
        base = load_run_config(source)
        if data:
            base = replace(base, data=replace(base.data, source=data))
    else:
        model = ckpt.load_autoencoder(directory)
        preset = "vqgan" if model.cfg.architecture == "vqgan" else "default"
        base = RunConfig(stage1_data(source, model, data), model.cfg, PRESETS[preset].train,
                         preset)
    # a fine-tune is itself what a --sharpen phase does: none inside it
    train = {"lr": base.train.lr * FINETUNE_LR_SCALE, "sharpen": 0.0, **(train or {})}
    tc = replace(base.train, **train, init_from=str(directory.resolve()),
                 decoder_only=True, codes_sha256=codes_fingerprint(directory))
    return replace(base, train=tc)


def _start_from(model: VQVAE, tc: TrainConfig) -> list[torch.nn.Parameter]:
    """Load ``tc.init_from`` into ``model``; the parameters to train (the decoder's alone when
    ``tc.decoder_only``: the encoder and quantizer are frozen)."""
    if tc.init_from:
        ckpt.load_weights(Path(tc.init_from), model)
    if not tc.decoder_only:
        return list(model.parameters())
    freeze_codes(model)
    return list(model.decoder.parameters())


def freeze_codes(model: VQVAE) -> None:
    """Stop training what decides the codes (encoder and quantizer): from here the decoder
    alone learns, so every code grid stays what it is."""
    for part in (model.encoder, model.quantizer):
        part.requires_grad_(False)


def resolve_config(cfg: RunConfig, splits: Splits) -> RunConfig:
    """Take the image size and channel count from the loaded data (and with them the colour
    jitter's default)."""
    channels = splits.train.channels
    data = cfg.data.resolved(channels)
    model = replace(cfg.model, image_size=cfg.data.size, in_channels=channels)
    return replace(cfg, data=data, model=model)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False
              ) -> torch.Tensor:
    """A uint8 batch (B, C, H, W) moved as uint8 (a quarter of the bytes), then mapped to float
    [-1, 1] on the device, channels-last when asked."""
    x = to_float(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def training_forward(model: VQVAE, tc: TrainConfig,
                     runtime: Runtime) -> Callable[[torch.Tensor], VQVAEOutput]:
    """What the loop calls: ``model``, wrapped for data parallelism on several ranks, compiled
    with ``tc.compile``; with ``channels_last`` the weights move to channels-last memory in place.
    Checkpoints, grids and evaluation keep using ``model``, so saved weights never carry a
    wrapper's prefixes (``module.``, ``_orig_mod.``)."""
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    net = data_parallel(model, runtime)
    return torch.compile(net, mode=tc.compile_mode) if tc.compile else net


def grid_images(splits: Splits, n: int) -> torch.Tensor:
    """A fixed selection of held-out images for n x n grids, comparable across steps (topped up
    with training images, and repeated when the data set has fewer images than the grid)."""
    need = grid_pairs(n)
    test = splits.test.take(torch.arange(min(need, len(splits.test))))
    if test.shape[0] >= need:
        return test
    images = torch.cat([test, splits.train.take(torch.arange(min(need, len(splits.train))))])
    return images.repeat(-(-need // images.shape[0]), 1, 1, 1)[:need]


def write_pictures(model: VQVAE, images: torch.Tensor, n: int, folder: Path,
                   suffix: str = "") -> dict[str, Path]:
    """The seed's three pictures (``sample_ae_1``, ``sample_ae_2``, ``sample_inter``)."""
    half = images.shape[0] // 2
    pairs = min(n, half)
    return {**reconstruction_pictures(model, images, n, folder, suffix),
            "sample_inter": interpolation_picture(model, images[:pairs],
                                                  images[half:half + pairs], n, folder, suffix)}


def train_step(net: Callable[[torch.Tensor], VQVAEOutput], model: VQVAE,
               opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
               tc: TrainConfig, sharpen: Sharpener | None = None, step: int = 0,
               decoder_only: bool = False) -> tuple[dict[str, torch.Tensor], VQVAEOutput]:
    """One Adam step on the VQ-VAE loss for a float batch ``x`` (B, C, H, W) on the device:
    ``net`` (``model`` as :func:`training_forward` wraps it) under ``tc.precision``'s autocast,
    the backward through fp16's loss ``scaler``, and with ``sharpen`` the perceptual and GAN
    terms and the discriminator's own step; with ``decoder_only`` (or ``tc.decoder_only``) the
    encoder and quantizer run as at evaluation. Returns the loss terms (0-d tensors on the
    device) and the forward's output. What the training loop and every benchmark of a step
    call."""
    if tc.compile and tc.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are done with
    if tc.decoder_only or decoder_only:  # frozen BatchNorm statistics, codebook, restarts
        model.encoder.eval()
        model.quantizer.eval()
    with autocast(tc.precision, x.device):
        out = net(x)
        losses = vqvae_losses(x, out, tc.recon_loss, tc.freq_weight, tc.freq_alpha)
        if sharpen is not None and sharpen.active:
            extra = sharpen.autoencoder_terms(step, x, out.reconstruction,
                                              losses[f"{tc.recon_loss}_x"], model.last_layer())
            losses |= {**extra, "loss": losses["loss"] + extra["loss"]}
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(opt)  # fp16: skipped (and the scale lowered) on inf/nan gradients
    scaler.update()
    if sharpen is not None:
        losses |= sharpen.discriminator_step(step, x, out.reconstruction)
    return losses, out


class Stage1:
    """Stage 1 for the run driver (:func:`vqvae.training.driver.run`): the VQ-VAE, Adam and the
    GAN/perceptual companions; one step on the VQ-VAE loss with codebook health and the share of
    time spent waiting for data over the last ``every`` steps; grids, held-out metrics and the
    usage histogram at each save."""

    desc = "train vqvae"

    def __init__(self, cfg: RunConfig, run_dir: str | Path, runtime: Runtime,
                 splits: Splits | None = None):
        splits = splits or load_splits(cfg.data)
        cfg = resolve_config(cfg, splits)
        tc = cfg.train
        torch.manual_seed(tc.seed)  # the same seed on every rank: identical initial weights
        model = VQVAE(cfg.model).to(runtime.device)
        # fused: one kernel for the whole update on CUDA (and no host sync for fp16's scaler)
        opt = torch.optim.Adam(_start_from(model, tc), lr=tc.lr,
                               fused=runtime.device.type == "cuda")
        self.phases: Phases | None = None  # the --sharpen split, once the run's clock is known
        self.frozen = tc.decoder_only  # the encoder and quantizer no longer train
        self.sharpen = Sharpener(tc, cfg.model.in_channels, cfg.model.image_size, runtime,
                                 self.sharpening if tc.sharpen else None)
        self.state = TrainingState(VQVAE_KIND, model, cfg.model, opt, loss_scaler(
            tc.precision, runtime.device), self.sharpen.companions())
        self.cfg, self.run_dir, self.model, self.opt = cfg, Path(run_dir), model, opt
        self.splits, self.runtime = splits, runtime
        self.batches: Iterator[Batch] | None = None  # opened at the first step trained
        self.usage = CodeUsage(cfg.model.codebook_size, tc.every, runtime.device)
        self.grid = grid_images(splits, tc.grid)
        self.waited, self.window_start, self.skipped = 0.0, perf_counter(), 0
        self.window_skipped = self.window_images = 0
        self.halt: str | None = None

    @property
    def loop(self) -> TrainConfig:
        return self.cfg.train

    def prepare(self, start: int) -> None:
        runs.prepare_run(self.run_dir, VQVAE_KIND, self.cfg, start)
        print(f"training on {len(self.splits.train)} images; held out: "
              f"{len(self.splits.test)} images, {self.splits.held_out or 'given'}", flush=True)

    def begin(self, clock: RunClock) -> None:
        # ``net`` trains; ``model`` is saved and evaluated (no wrapper prefixes in checkpoints)
        self.net = training_forward(self.model, self.cfg.train, self.runtime)
        # the autoencoder's, with the --sharpen phase at the fine-tune's share of the rate; the
        # discriminator's is flat
        self.phases = Phases(clock, self.cfg.train.sharpen)
        self.schedule = Schedule(self.cfg.train, self.opt, clock, self.phases,
                                 FINETUNE_LR_SCALE)

    def sharpening(self, step: int) -> bool:
        """Whether ``step`` is in the --sharpen phase (decoder alone, discriminator on)."""
        return self.phases is not None and self.phases.last(step)

    def next_batch(self, step: int) -> torch.Tensor:
        """Step ``step``'s uint8 batch; the time spent waiting for it is counted."""
        if self.batches is None:
            tc = self.cfg.train
            self.batches = train_batches(self.splits.train, self.cfg.data, tc.batch_size,
                                         tc.seed, step, self.runtime.rank,
                                         self.runtime.world_size,
                                         pin_memory=self.runtime.device.type == "cuda",
                                         device=self.runtime.device)
            self.window_start = perf_counter()
        began = perf_counter()
        batch = next(self.batches)
        self.waited += perf_counter() - began
        self.skipped += batch.skipped
        self.window_skipped += batch.skipped
        self.window_images += len(batch.images)
        return batch.images

    def step(self, step: int) -> dict[str, torch.Tensor]:
        tc = self.cfg.train
        x = to_device(self.next_batch(step), self.runtime.device, tc.channels_last)
        if self.sharpening(step) and not self.frozen:  # the --sharpen phase starts (or resumes)
            freeze_codes(self.model)
            self.frozen = True
            # data parallelism must know which parameters get no gradient from now on
            self.net = training_forward(self.model, tc, self.runtime)
        self.schedule.set(step)
        losses, out = train_step(self.net, self.model, self.opt, self.state.scaler, x, tc,
                                 self.sharpen, step, decoder_only=self.frozen)
        self.usage.update(out.quantized.indices)
        return losses

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]:
        tc, health = self.cfg.train, self.usage.stats()
        now = perf_counter()
        wait = self.waited / max(now - self.window_start, 1e-9)
        self.waited, self.window_start = 0.0, now
        share = self.window_skipped / max(self.window_images, 1)
        self.window_skipped = self.window_images = 0
        limit = self.cfg.data.max_unreadable
        if any_rank(share > limit, self.runtime):
            self.halt = (f"{share:.0%} of the training images of the last steps could not be read "
                         f"(over --max-unreadable {limit:.0%}): were files deleted or damaged?")
        restarted = getattr(self.model.quantizer, "restarted", None)
        restarts = {}
        if restarted is not None:  # codes re-seeded in this window (alike on every rank)
            restarts = {"restarts": float(restarted.item())}
            restarted.zero_()
        return ({f"window_{k}": health[k] for k in HEALTH} | {"data_wait": wait} | restarts
                | {"lr": self.schedule.lr}  # the last step's
                | ({"sharpening": float(self.frozen)} if tc.sharpen else {})
                | ({"skipped_images": float(self.skipped), "skipped_share": share}
                   if self.skipped else {}))

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]:
        return ({k: f"{record[k]:.4f}" for k in ("l1_x", "mse_x", "freq_x", "mse_e", "mse_z")
                 if k in record}
                | {"use%": f"{record['window_usage']:.0f}",
                   "dead": str(record["window_dead_codes"])}
                | ({"wait%": f"{100 * record['data_wait']:.0f}"} if record["data_wait"] >= 0.05
                   else {})
                | ({"g": f"{record['gan_g']:.3f}", "d": f"{record['gan_d']:.3f}"}
                   if "gan_d" in record else {})
                | ({"unreadable": f"{int(record['skipped_images'])} "
                                  f"({record['skipped_share']:.0%})"}
                   if record.get("skipped_images") else {})
                | ({"psnr": f"{metrics['psnr']:.2f}"} if metrics else {}))

    def curves(self, train: list[dict], evals: list[dict]) -> Path:
        return plot_curves(train, evals, self.run_dir / "curves.png")

    def evaluate(self, limit: int) -> Scored:
        """Held-out metrics of the first ``limit`` test images (0: all), sharded over ranks, and
        the per-code counts."""
        test = self.splits.test
        if limit and limit < len(test):
            test = test.subset(torch.arange(limit))
        scored = Scored(*score_autoencoder(self.model, test, self.cfg.train.batch_size,
                                           device=self.runtime.device, rank=self.runtime.rank,
                                           world_size=self.runtime.world_size,
                                           workers=self.cfg.data.workers))
        read, limit = int(scored.metrics["images"]), self.cfg.data.max_unreadable
        if read < (1 - limit) * len(test) and self.halt is None:  # alike on every rank
            self.halt = (f"only {read} of the {len(test)} held-out images could be read (over "
                         f"--max-unreadable {limit:.0%} missing): were files deleted or damaged?")
        return scored

    def pictures(self, step: int | None) -> dict[str, Path]:
        """The seed's grids: under ``samples/`` per checkpoint, in the run folder at the end."""
        if step is None:
            return write_pictures(self.model, self.grid, self.cfg.train.grid, self.run_dir)
        return write_pictures(self.model, self.grid, self.cfg.train.grid,
                              self.run_dir / "samples", f"_{step:07d}")

    def saved(self, step: int, scored: Scored, checkpoint: Path) -> dict[str, Path]:
        return {"code_usage": plot_code_usage(
            scored.extra, self.run_dir / "samples" / f"code_usage_{step:07d}.png")}

    def finished(self, step: int, scored: Scored) -> dict[str, Path]:
        return {"code_usage": plot_code_usage(scored.extra, self.run_dir / "code_usage.png")}

    def headline(self, step: int, final: dict[str, float]) -> str:
        return (f"trained to step {step}; run folder: {self.run_dir}\n"
                f"held-out ({int(final['images'])} images, {self.splits.held_out or 'given'}): "
                f"PSNR {final['psnr']:.2f} dB with "
                f"quantization, {final['psnr_noq']:.2f} dB without; SSIM {final['ssim']:.4f} "
                f"with, {final['ssim_noq']:.4f} without; codebook usage "
                f"{final['usage']:.1f}% ({final['used_codes']}/{self.cfg.model.codebook_size}), "
                f"perplexity {final['perplexity']:.1f}"
                + (f"\nthe last {self.cfg.train.sharpen:.0%} of the budget trained the decoder "
                   f"alone against a discriminator (--sharpen; the codes are those it began with)"
                   if self.cfg.train.sharpen and self.frozen else "")
                + (f"\n{self.skipped} training image(s) could not be read and were replaced by "
                   f"others (train.jsonl: skipped_images)" if self.skipped else ""))


def train_autoencoder(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                      runtime: Runtime | None = None, progress: bool = True,
                      splits: Splits | None = None) -> RunResult:
    """Train (or, with ``resume``, continue) a VQ-VAE in ``run_dir``; returns final metrics."""
    check_loggers(cfg.train)  # before the data loads
    with nullcontext(runtime) if runtime else launch(cfg.train.device) as runtime:
        return run(Stage1(cfg, run_dir, runtime, splits), resume=resume, progress=progress)


def finetune_decoder(source: str | Path, run_dir: str | Path, train: dict | None = None, *,
                     data: str | None = None, runtime: Runtime | None = None,
                     progress: bool = True) -> RunResult:
    """``vqvae finetune-decoder``: train the decoder of the stage-1 model at ``source`` alone in
    a new run (:func:`finetune_config`, with fields of ``train`` overridden, on ``data`` when
    given), so codes and priors made with ``source`` decode with the result."""
    return train_autoencoder(finetune_config(source, train, data), run_dir, runtime=runtime,
                             progress=progress)
