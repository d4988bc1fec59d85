"""diffusers' ``VQModel`` folders, both ways: a ``vqgan`` VQ-VAE written as a folder that
``diffusers.VQModel.from_pretrained`` loads, and such a folder read as a :class:`VQVAE`.

The VQModel is taming's VQGAN (Esser et al. 2021, arXiv:2012.09841). Its weights map onto ours
through one explicit table (:func:`weight_table`); nothing imports diffusers and nothing is
unpickled: the folder is JSON and safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import safetensors.torch as st
import torch
from safetensors import SafetensorError

from ..config import VQVAEConfig
from ..distributed import pick_device
from ..errors import CheckpointError, ConfigError
from ..fileio import fsync_dir, read_json, write_bytes, write_json
from ..models.autoencoder import VQVAE

CLASS_NAME = "VQModel"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS_FILE + ".index.json"  # a sharded checkpoint's map: tensor -> file
PICKLED_FILE = "diffusion_pytorch_model.bin"
WRITTEN_FOR = "0.42.1"  # the diffusers version exports are checked against (tests/store)

DOWN, ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
UP, ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

# VQModel's arguments and their defaults (a config.json may leave any out). The last three only
# matter to pipelines (latent scaling, fp16 upcasting, what ``decode`` takes): no vqvae
# counterpart, accepted and not kept.
VQMODEL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": [DOWN], "up_block_types": [UP],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 3,
    "sample_size": 32, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
    "norm_type": "group", "mid_block_add_attention": True,
    "scaling_factor": 0.18215, "force_upcast": False, "lookup_from_codebook": False,
}



def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _counts(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(map(_count, v))


def _names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


# What each setting's value must be, and its words (another JSON type is one line, not a crash).
VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_count, "a positive integer") for k in (
        "in_channels", "out_channels", "latent_channels", "num_vq_embeddings", "norm_num_groups")},
    "layers_per_block": (lambda v: _count(v) or v == 0, "an integer >= 0"),
    "vq_embed_dim": (lambda v: v is None or _count(v), "a positive integer or null"),
    "sample_size": (lambda v: _count(v) or (_counts(v) and len(v) == 2),
                    "a positive integer or a list of two"),
    "block_out_channels": (_counts, "a list of positive integers"),
    "down_block_types": (_names, "a list of block names"),
    "up_block_types": (_names, "a list of block names"),
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("act_fn", "norm_type")},
    **{k: (lambda v: isinstance(v, bool), "true or false") for k in (
        "mid_block_add_attention", "force_upcast", "lookup_from_codebook")},
    "scaling_factor": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                       "a number"),
}


# --- recognising a folder ----------------------------------------------------------------------


def diffusers_class(folder: str | Path) -> str | None:
    """The ``_class_name`` of a diffusers model folder's ``config.json``; None for any other
    folder (a vqvae checkpoint's config is tagged ``kind``, a run's too). Never raises."""
    path = Path(folder) / CONFIG_FILE
    try:
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = meta.get("_class_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def weight_files(folder: str | Path) -> list[Path]:
    """The files holding a diffusers folder's weights: the safetensors file, or the shards a
    sharded checkpoint's index names (in name order); an unreadable index names none."""
    folder, index = Path(folder), Path(folder) / WEIGHTS_INDEX
    if not index.is_file():
        return [folder / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
        return [folder / name for name in sorted(set(map(str, weight_map.values())))]
    except (OSError, ValueError, AttributeError):
        return []


# --- configs -----------------------------------------------------------------------------------


def config_from_diffusers(raw: dict[str, Any], where: Path) -> VQVAEConfig:
    """The vqvae config of a VQModel ``config.json`` (read from ``where``); a setting vqvae cannot
    express is a :class:`CheckpointError` naming the file and the setting."""

    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}")

    if raw.get("_class_name") != CLASS_NAME:
        raise refuse(f"a diffusers {raw.get('_class_name')!r}, not a {CLASS_NAME}: vqvae imports "
                     f"VQModel folders only")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in VQMODEL_DEFAULTS)
    if unknown:
        raise refuse(f"unknown VQModel setting(s) {', '.join(unknown)} (a newer diffusers than "
                     f"{WRITTEN_FOR}?)")
    c = {**VQMODEL_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    wrong = [k for k, v in c.items() if not VALID[k][0](v)]
    if wrong:
        raise refuse(f"{wrong[0]} must be {VALID[wrong[0]][1]}, got {c[wrong[0]]!r}")
    if c["norm_type"] != "group":
        raise refuse(f"norm_type {c['norm_type']!r} (SpatialNorm in the decoder) has no vqvae "
                     f"counterpart: only norm_type 'group' imports")
    if c["act_fn"] not in ("silu", "swish"):
        raise refuse(f"act_fn {c['act_fn']!r}: vqvae's vqgan blocks use SiLU only")
    if c["out_channels"] != c["in_channels"]:
        raise refuse(f"out_channels {c['out_channels']} differs from in_channels "
                     f"{c['in_channels']}: a vqvae model reconstructs its input's channels")
    widths, down, up = (list(c["block_out_channels"]), list(c["down_block_types"]),
                        list(c["up_block_types"]))
    if not widths or not len(widths) == len(down) == len(up):
        raise refuse(f"block_out_channels, down_block_types and up_block_types need one entry "
                     f"per level, got {len(widths)}, {len(down)}, {len(up)}")
    plain, with_attention = [DOWN] * len(widths), [DOWN] * (len(widths) - 1) + [ATTN_DOWN]
    if (down, up) not in ((plain, [UP] * len(widths)),
                          (with_attention, [ATTN_UP] + [UP] * (len(widths) - 1))):
        raise refuse(f"down_block_types {down} and up_block_types {up}: vqvae's vqgan attends "
                     f"at the lowest level (AttnDownEncoderBlock2D last, AttnUpDecoderBlock2D "
                     f"first) or nowhere outside the middle block")
    level_attention = down == with_attention
    if level_attention and not c["mid_block_add_attention"]:
        raise refuse("attention at the lowest level needs mid_block_add_attention true in "
                     "vqvae's vqgan (it attends in both places or the middle alone)")
    if any(w % widths[0] for w in widths):
        raise refuse(f"block_out_channels {widths} are not multiples of the first, as vqvae's "
                     f"channel_mult needs")
    size = c["sample_size"]
    if isinstance(size, list):
        if size[0] != size[1]:
            raise refuse(f"sample_size {size}: vqvae models take square images")
        size = size[0]
    try:
        return VQVAEConfig(
            image_size=size, in_channels=c["in_channels"], architecture="vqgan",
            hidden_channels=widths[0], downsamples=len(widths) - 1,
            res_blocks=c["layers_per_block"], channel_mult=tuple(w // widths[0] for w in widths),
            attention=bool(c["mid_block_add_attention"]),
            middle_attention_only=bool(c["mid_block_add_attention"]) and not level_attention,
            downsample_padding="asymmetric", decoder_res_blocks=c["layers_per_block"] + 1,
            latent_channels=c["latent_channels"], norm_groups=c["norm_num_groups"],
            codebook_size=c["num_vq_embeddings"],
            code_dim=c["vq_embed_dim"] or c["latent_channels"], beta=0.25, quantizer="vq",
            weight_init="torch")
    except ConfigError as e:
        raise refuse(f"no vqvae model matches: {e}") from None


def diffusers_config(cfg: VQVAEConfig) -> dict[str, Any]:
    """The VQModel ``config.json`` of a vqvae model; a :class:`ConfigError` naming what diffusers'
    VQModel cannot express (another architecture or quantizer, cosine codes, a lookup
    projection, a decoder without taming's extra block, symmetric downsampling)."""
    missing = _inexpressible(cfg)
    if missing:
        raise ConfigError(f"diffusers' VQModel cannot express this model: {missing}")
    widths = list(cfg.level_widths)
    level_attention = cfg.attention and not cfg.middle_attention_only
    down = [DOWN] * (len(widths) - 1) + [ATTN_DOWN if level_attention else DOWN]
    up = [ATTN_UP if level_attention else UP] + [UP] * (len(widths) - 1)
    return {"_class_name": CLASS_NAME, "_diffusers_version": WRITTEN_FOR,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": down, "up_block_types": up, "block_out_channels": widths,
            "layers_per_block": cfg.res_blocks, "act_fn": "silu",
            "latent_channels": cfg.latent_channels or cfg.code_dim,
            "sample_size": cfg.image_size, "num_vq_embeddings": cfg.codebook_size,
            "norm_num_groups": cfg.norm_groups, "vq_embed_dim": cfg.code_dim,
            "scaling_factor": 1.0, "norm_type": "group",
            "mid_block_add_attention": cfg.attention, "lookup_from_codebook": False,
            "force_upcast": False}


def _inexpressible(cfg: VQVAEConfig) -> str | None:
    """Which part of ``cfg`` diffusers' VQModel has no counterpart for, in words; None if none."""
    if cfg.architecture != "vqgan":
        return (f"it has no {cfg.architecture} architecture (BatchNorm blocks, transposed convs): "
                f"only vqgan models export")
    if cfg.quantizer == "fsq":
        return "it has no FSQ quantizer (its codes are a learned codebook)"
    if cfg.cosine:
        return "its codebook lookup is Euclidean, not cosine (cosine=true)"
    if cfg.lookup_dim is not None:
        return "it has no lookup projection (lookup_dim)"
    if cfg.downsample_padding != "asymmetric":
        return ("its stride-2 convs pad right and bottom only, this model's on every side "
                "(downsample_padding symmetric)")
    if cfg.decoder_blocks != cfg.res_blocks + 1:
        return (f"its decoder has layers_per_block + 1 = {cfg.res_blocks + 1} residual blocks per "
                f"level, this model's {cfg.decoder_blocks}")
    return None


# --- the weight table --------------------------------------------------------------------------


class Entry(NamedTuple):
    """One of our tensors and the diffusers tensor(s) it is: ``copy`` (same shape), ``linear``
    (our 1x1 conv (C, C, 1, 1) is their linear (C, C)), ``qkv`` (our fused q, k, v conv, weight
    (3C, C, 1, 1) or bias (3C,), is their to_q, to_k, to_v)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str


class _Table:
    """Builds the entries of a walk over one half (encoder or decoder) of both models."""

    def __init__(self, ours: str, theirs: str):
        self.ours, self.theirs, self.index, self.entries = ours, theirs, 0, []

    def _add(self, suffix: str, their: str, kind: str = "copy") -> None:
        self.entries.append(Entry(f"{self.ours}.{self.index}{suffix}", (their,), kind))

    def layer(self, their: str, *, top: bool = False, inner: str = "") -> None:
        """A conv or GroupNorm: weight and bias (``top``: a name outside encoder/decoder;
        ``inner``: the layer's name inside our module, e.g. Upsample's ``.conv``)."""
        name = their if top else f"{self.theirs}.{their}"
        for p in ("weight", "bias"):
            self._add(f"{inner}.{p}", f"{name}.{p}")
        self.index += 1

    def skip(self) -> None:  # a layer without weights (SiLU)
        self.index += 1

    def resnet(self, their: str, shortcut: bool) -> None:
        """Our GroupNormResBlock: body = GN, SiLU, conv, GN, SiLU, conv; a 1x1 shortcut."""
        parts = [("body.0", "norm1"), ("body.2", "conv1"), ("body.3", "norm2"),
                 ("body.5", "conv2"), *([("shortcut", "conv_shortcut")] if shortcut else [])]
        for mine, theirs in parts:
            for p in ("weight", "bias"):
                self._add(f".{mine}.{p}", f"{self.theirs}.{their}.{theirs}.{p}")
        self.index += 1

    def attention(self, their: str) -> None:
        """Our SelfAttention: norm, fused qkv 1x1 conv, proj 1x1 conv."""
        base = f"{self.theirs}.{their}"
        for p in ("weight", "bias"):
            self._add(f".norm.{p}", f"{base}.group_norm.{p}")
            self.entries.append(Entry(f"{self.ours}.{self.index}.qkv.{p}",
                                      tuple(f"{base}.to_{x}.{p}" for x in "qkv"), "qkv"))
            self._add(f".proj.{p}", f"{base}.to_out.0.{p}", "linear" if p == "weight" else "copy")
        self.index += 1


def weight_table(cfg: VQVAEConfig) -> list[Entry]:
    """Every tensor of a vqgan :class:`VQVAE` (but training statistics: EMA sums, restart
    counters) and the VQModel tensor(s) it is, walking both architectures level by level as
    ``models/vqgan.py`` builds ours and diffusers builds its Encoder and Decoder. The quant convs
    are ours when ``cfg.latent_channels`` is set (the export writes identities otherwise)."""
    widths, lowest = cfg.level_widths, len(cfg.level_widths) - 1
    level_attention = cfg.attention and not cfg.middle_attention_only

    def middle(t: _Table) -> None:
        t.resnet("mid_block.resnets.0", False)
        if cfg.attention:
            t.attention("mid_block.attentions.0")
        t.resnet("mid_block.resnets.1", False)

    enc = _Table("encoder", "encoder")
    enc.layer("conv_in")
    width = widths[0]
    for level, out in enumerate(widths):
        for b in range(cfg.res_blocks):
            enc.resnet(f"down_blocks.{level}.resnets.{b}", b == 0 and width != out)
            if level_attention and level == lowest:
                enc.attention(f"down_blocks.{level}.attentions.{b}")
        width = out
        if level != lowest:
            enc.layer(f"down_blocks.{level}.downsamplers.0.conv")
    middle(enc)
    enc.layer("conv_norm_out")
    enc.skip()
    enc.layer("conv_out")
    if cfg.latent_channels:
        enc.layer("quant_conv", top=True)

    dec = _Table("decoder", "decoder")
    if cfg.latent_channels:
        dec.layer("post_quant_conv", top=True)
    dec.layer("conv_in")
    middle(dec)
    width = widths[-1]
    for up, level in enumerate(reversed(range(len(widths)))):
        for b in range(cfg.decoder_blocks):
            dec.resnet(f"up_blocks.{up}.resnets.{b}", b == 0 and width != widths[level])
            if level_attention and level == lowest:
                dec.attention(f"up_blocks.{up}.attentions.{b}")
        width = widths[level]
        if level > 0:
            dec.layer(f"up_blocks.{up}.upsamplers.0.conv", inner=".conv")
    dec.layer("conv_norm_out")
    dec.skip()
    dec.layer("conv_out")
    return [*enc.entries, Entry("quantizer.codebook", ("quantize.embedding.weight",), "copy"),
            *dec.entries]


def to_diffusers(cfg: VQVAEConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> a VQModel's (identity quant convs when ``cfg`` has none)."""
    out: dict[str, torch.Tensor] = {}
    for e in weight_table(cfg):
        t = ours[e.ours].detach().cpu()
        if e.kind == "qkv":
            out.update(zip(e.theirs, (p.reshape(p.shape[0], -1).squeeze(-1) if p.dim() > 1
                                      else p for p in t.chunk(3))))
        else:
            out[e.theirs[0]] = t.reshape(t.shape[:2]) if e.kind == "linear" else t
    if not cfg.latent_channels:  # (D, D, 1, 1) identities: exact in float arithmetic
        eye = torch.eye(cfg.code_dim).reshape(cfg.code_dim, cfg.code_dim, 1, 1)
        for name in ("quant_conv", "post_quant_conv"):
            out[f"{name}.weight"], out[f"{name}.bias"] = eye.clone(), torch.zeros(cfg.code_dim)
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(cfg: VQVAEConfig, theirs: dict[str, torch.Tensor],
                   where: Path) -> dict[str, torch.Tensor]:
    """A VQModel's state dict (read from ``where``) -> ours for ``cfg``; a missing tensor is a
    :class:`CheckpointError` naming it and the file."""
    out: dict[str, torch.Tensor] = {}
    for e in weight_table(cfg):
        absent = [name for name in e.theirs if name not in theirs]
        if absent:
            raise CheckpointError(f"{where} holds no tensor {absent[0]} (a VQModel of this "
                                  f"config.json has one)")
        parts = [theirs[name] for name in e.theirs]
        if e.kind == "qkv":
            out[e.ours] = torch.cat([p.reshape(*p.shape, 1, 1) if p.dim() > 1 else p
                                     for p in parts])
        elif e.kind == "linear":
            out[e.ours] = parts[0].reshape(*parts[0].shape, 1, 1)
        else:
            out[e.ours] = parts[0]
    return out


# --- in ----------------------------------------------------------------------------------------


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a diffusers folder (one safetensors file or the shards its index names),
    and the file to name in messages. A folder with only pickled weights is refused."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        files, where = weight_files(folder), index
        if not files:
            raise CheckpointError(f"{index} has no weight_map (expected a sharded safetensors "
                                  f"index)")
    elif (folder / WEIGHTS_FILE).is_file():
        files, where = [folder / WEIGHTS_FILE], folder / WEIGHTS_FILE
    elif (folder / PICKLED_FILE).is_file():
        raise CheckpointError(f"{folder} holds only {PICKLED_FILE}, a pickle, which vqvae never "
                              f"loads: save the model with safe_serialization=True "
                              f"({WEIGHTS_FILE})")
    else:
        raise CheckpointError(f"{folder} holds no {WEIGHTS_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(st.load(path.read_bytes()))
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        except (SafetensorError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors, where


def read_diffusers(folder: str | Path) -> tuple[VQVAEConfig, dict[str, torch.Tensor]]:
    """A VQModel folder's vqvae config and its weights under our names, checked against the
    model that config builds (names and shapes)."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_FILE)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a diffusers config (expected a "
                              f"JSON object)")
    cfg = config_from_diffusers(raw, folder / CONFIG_FILE)
    tensors, where = _read_tensors(folder)
    ours = from_diffusers(cfg, tensors, where)
    used = {name for e in weight_table(cfg) for name in e.theirs}
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{where} holds {len(extra)} tensor(s) a VQModel of its "
                              f"config.json has not (e.g. {extra[0]})")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = VQVAE(cfg).state_dict()
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            their = next(e.theirs for e in weight_table(cfg) if e.ours == name)
            raise CheckpointError(f"{where}: {', '.join(their)} has shape "
                                  f"{tuple(tensors[their[0]].shape)}, but its config.json makes "
                                  f"it {_their_shape(expected[name], len(their))}")
    return cfg, ours


def _their_shape(ours: torch.Tensor, parts: int) -> tuple[int, ...]:
    shape = (ours.shape[0] // parts, *ours.shape[1:])
    return shape[:2] if parts > 1 and len(shape) == 4 else shape


def load_diffusers(folder: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """A diffusers VQModel folder as a vqvae stage-1 model (eval mode): the same encodings, code
    ids and decodings. Its quantizer is a plain ``vq`` codebook with beta 0.25; what diffusers
    keeps only for pipelines (scaling_factor, force_upcast, lookup_from_codebook) is dropped."""
    cfg, weights = read_diffusers(folder)
    model = VQVAE(cfg)
    copy_weights(model, weights)
    return model.to(pick_device(device)).eval()


def copy_weights(model: VQVAE, weights: dict[str, torch.Tensor]) -> None:
    """Load converted ``weights`` into ``model``, keeping its own training statistics (the
    buffers a VQModel has no counterpart for, e.g. an EMA codebook's sums) where it has any."""
    model.load_state_dict({**model.state_dict(), **weights})


# --- out ---------------------------------------------------------------------------------------


def export_diffusers(model: VQVAE, out: str | Path) -> Path:
    """Write ``model`` (a vqgan :class:`VQVAE`) as a folder that ``diffusers.VQModel
    .from_pretrained(out)`` loads, with the same reconstructions and code ids: ``config.json``
    and ``diffusion_pytorch_model.safetensors``. A model VQModel cannot express is a
    :class:`ConfigError` naming the part. Written into a temporary folder renamed into place, so
    nothing half-written is ever left; an existing ``out`` must be empty or such a folder."""
    cfg, out = model.cfg, Path(out)
    config = diffusers_config(cfg)  # refuses before anything is written
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or diffusers_class(out) == CLASS_NAME)):
        raise ConfigError(f"{out} exists and is not a VQModel folder: export to a new folder")
    weights = to_diffusers(cfg, model.state_dict())
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_bytes(tmp / WEIGHTS_FILE, st.save(weights, metadata={"format": "pt"}))
        write_json(tmp / CONFIG_FILE, config)
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    return out
