"""Write the perceptual loss's weights (LPIPS-VGG16, Zhang et al. 2018, arXiv:1801.03924) as the
one safetensors file that ``vqvae.load_perceptual`` reads, from the two published files.

Inputs, downloaded by you (this script fetches nothing; see docs/perceptual.md):
  --vgg  torchvision's VGG16 ImageNet weights, vgg16-397923af.pth
  --lin  LPIPS v0.1's linear layers for VGG, vgg.pth (PerceptualSimilarity / the lpips package)
Both are read with ``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which
builds tensors and plain containers only. The output keeps the 13 convolutions of ``features``
(torchvision's names) and renames ``lin{l}.model.1.weight`` to ``lins.{l}.weight``.

    PYTHONPATH=src python scripts/convert_lpips.py --vgg vgg16-397923af.pth --lin vgg.pth \\
        --out lpips_vgg16.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch as st
import torch

from vqvae.models.lpips import (LIN_SHA256, LPIPS, VGG_SHA256_PREFIX, load_perceptual,
                                tensors_sha256)


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A .pth state dict, through the restricted unpickler only."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found") from None
    except Exception as e:  # any failure to read a user's file ends the same way
        raise SystemExit(f"error: cannot read {path} as PyTorch weights: {e}") from None
    if not isinstance(data, Mapping):
        raise SystemExit(f"error: {path} holds a {type(data).__name__}, not a state dict")
    return data


def convert(vgg: Mapping[str, torch.Tensor],
            lin: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``load_perceptual`` expects, picked and renamed from the two state dicts."""
    if "features.0.weight" not in vgg and "0.weight" in vgg:  # a saved ``vgg16().features``
        vgg = {f"features.{k}": v for k, v in vgg.items()}
    out = {}
    for key, want in LPIPS().state_dict().items():
        if key.startswith("lins."):
            source, name, src = lin, f"lin{key.split('.')[1]}.model.1.weight", "--lin"
        else:
            source, name, src = vgg, key, "--vgg"
        if name not in source:
            raise SystemExit(f"error: {src} file has no {name} (is it the right file?)")
        tensor = source[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise SystemExit(f"error: {src} {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(want.shape)}")
        out[key] = tensor.detach().to(torch.float32).contiguous()
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vgg", type=Path, required=True, help="torchvision's vgg16-397923af.pth")
    p.add_argument("--lin", type=Path, required=True, help="LPIPS v0.1's vgg.pth")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = p.parse_args(argv)
    tensors = convert(read_state_dict(args.vgg), read_state_dict(args.lin))
    vgg_sha, lin_sha = sha256(args.vgg), sha256(args.lin)
    if not vgg_sha.startswith(VGG_SHA256_PREFIX):
        print(f"warning: {args.vgg} is not torchvision's vgg16-{VGG_SHA256_PREFIX}.pth "
              f"(sha256 {vgg_sha[:8]}...); converted anyway", file=sys.stderr)
    if lin_sha != LIN_SHA256:
        print(f"warning: {args.lin} is not LPIPS v0.1's published vgg.pth (sha256 "
              f"{lin_sha[:8]}...); converted anyway", file=sys.stderr)
    meta = {"format": "lpips-vgg16", "vgg_sha256": vgg_sha, "lin_sha256": lin_sha,
            "tensors_sha256": tensors_sha256(tensors)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
    try:
        st.save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    load_perceptual(args.out)  # the file reads back through the package's own checks
    print(f"wrote {args.out}: {len(tensors)} tensors, {args.out.stat().st_size / 2**20:.1f} MiB "
          f"(vgg sha256 {vgg_sha[:12]}..., lin sha256 {lin_sha[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
