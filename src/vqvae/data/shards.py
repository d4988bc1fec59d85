"""WebDataset-style tar shards: naming them, indexing their members, and writing them.

A shard is an uncompressed tar whose consecutive members sharing a key (the member name up to
the first dot of its base name) form one sample: ``000123.jpg`` and ``000123.cls`` (the class id
as text). This is the convention of WebDataset (Aizman et al., "High Performance I/O for Large
Scale Deep Learning", 2019) and img2dataset; shards written by those tools read here too.
:func:`pack` writes shards from an image folder, resumably, with a ``shards.json`` manifest that
keeps the class names, and beside every shard an index of its samples (``NAME.tar.idx.json``)
that lets a training run skip reading the shard's member headers. The manifest records the
sha256 of each shard and index and of its own contents; readers check what they trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from ..fileio import sha256
from .files import IMAGE_EXTENSIONS, TarFiles, folder_files

MANIFEST = "shards.json"
MANIFEST_KIND = "vqvae-shards"
INDEX_SUFFIX, INDEX_KIND = ".idx.json", "vqvae-shard-index"
_IMAGE_SUFFIXES = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion as WebDataset writes shard lists: ``train-{000..127}.tar`` (zero padding
    kept) and ``{a,b}``; several groups multiply."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
            raise DataError(f"bad shard range {{{body}}} in {pattern!r}: use {{000..127}}")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_pattern(head + item + tail)]


def is_shard_source(source: str) -> bool:
    """A shard pattern, one .tar file, or a folder holding .tar shards and no images."""
    if "{" in source or source.endswith(".tar"):
        return True
    path = Path(source).expanduser()
    # the image check first: it stops at the first image of a flat folder, where looking for a
    # .tar that is not there would list every file
    return path.is_dir() and ((path / MANIFEST).exists() or (
        not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
        and any(path.glob("*.tar"))))


def shard_paths(source: str) -> list[Path]:
    """The shard files a source names, each checked to exist."""
    path = Path(source).expanduser()
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise DataError(f"no .tar shards in {path}")
        return paths
    paths = [Path(p).expanduser() for p in expand_pattern(source)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} shard(s) not found, e.g. {missing[0]}")
    return paths


def _key(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: ``a/b/000123.jpg`` -> (``a/b/000123``, ``jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


@dataclass(frozen=True)
class ShardIndex:
    """The samples of a list of shards: where each image is, its key and its label (-1: none)."""

    files: TarFiles
    keys: np.ndarray  # (N,) bytes
    labels: np.ndarray  # (N,) int64


Sample = tuple[int, int, str, int]  # (data offset, size, image member name, label or -1)


def index_shards(paths: list[Path], progress: bool = True) -> ShardIndex:
    """One sample per key with an image member, across ``paths``; a ``.cls`` member gives its
    label. A shard written by :func:`pack` is indexed from the file beside it; any other is read
    member header by member header (not the images)."""
    shard_ids, offsets, lengths, names, keys, labels = [], [], [], [], [], []
    manifest = read_manifest(paths[0].parent) if paths else None
    records = {s.get("name"): s for s in (manifest or {}).get("shards", [])
               if isinstance(s, dict)}
    for shard_id, path in enumerate(tqdm(paths, desc="indexing shards", unit="shard",
                                         disable=not progress or len(paths) < 8, leave=False)):
        samples = _read_index(path, records.get(path.name))
        if samples is None:
            try:
                with tarfile.open(path, "r:") as tar:
                    samples = _scan(tar, path)
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"cannot read shard {path}: {e} (shards are uncompressed .tar)"
                                ) from None
        for offset, size, name, label in samples:
            shard_ids.append(shard_id)
            offsets.append(offset)
            lengths.append(size)
            names.append(name.encode())
            keys.append(_key(name)[0].encode())
            labels.append(label)
    if not offsets:
        raise DataError(f"the {len(paths)} shard(s) hold no images (members named KEY.jpg, "
                        f"KEY.png, ...)")
    files = TarFiles(tuple(str(p) for p in paths), np.array(shard_ids, dtype=np.int32),
                     np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64),
                     np.array(names))
    return ShardIndex(files, np.array(keys), np.array(labels, dtype=np.int64))


def _scan(tar: tarfile.TarFile, path: Path) -> list[Sample]:
    """The samples of an open shard, from its member headers (in member order)."""
    samples: dict[str, list] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, suffix = _key(member.name)
        entry = samples.setdefault(key, [None, -1])
        if suffix in _IMAGE_SUFFIXES and entry[0] is None:
            entry[0] = member
        elif suffix == "cls":
            entry[1] = _read_label(tar, member, path)
    return [(member.offset_data, member.size, member.name, label)
            for member, label in samples.values() if member is not None]


def _read_index(path: Path, record: dict | None = None) -> list[Sample] | None:
    """The samples recorded beside a shard by :func:`pack`, if that index is there and was made
    for this very file (same size in bytes); None otherwise (the shard is scanned instead). An
    index whose bytes differ from the sha256 the manifest's ``record`` of the shard holds is not
    trusted either (its offsets would be read blindly): a warning names it."""
    index_path = path.with_name(path.name + INDEX_SUFFIX)
    try:
        raw = index_path.read_bytes()
    except OSError:
        return None
    recorded = (record or {}).get("index_sha256")
    if isinstance(recorded, str) and sha256(raw) != recorded:
        warnings.warn(f"{index_path} is corrupt: its sha256 differs from the one recorded in "
                      f"{path.parent / MANIFEST}; reading {path.name}'s member headers instead",
                      stacklevel=2)
        return None
    try:
        index = json.loads(raw)
        if (index.get("kind"), index.get("tar_bytes")) != (INDEX_KIND, path.stat().st_size):
            return None
        return [(int(o), int(n), str(name), int(label))
                for o, n, name, label in index["samples"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
    try:
        return int(raw.decode().strip())
    except ValueError:
        raise DataError(f"{path}: {member.name} holds {raw[:20]!r}, not a class id") from None


def held_out(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: whether each sample belongs to the held-out split, decided by a hash of its key
    (the same sample is held out whichever shard it sits in and however the shards are read)."""
    cut = fraction * (1 << 32)
    prefix = f"{seed}/".encode()
    return np.array([zlib.crc32(prefix + key) < cut for key in keys], dtype=bool)


def _contents_sha256(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "contents_sha256"}
    return sha256(json.dumps(body, sort_keys=True).encode())


def _seal(manifest: dict) -> bytes:
    """The manifest as written: its JSON with the sha256 of its other contents inside."""
    return json.dumps({**manifest, "contents_sha256": _contents_sha256(manifest)},
                      indent=1).encode()


def read_manifest(folder: Path) -> dict | None:
    """``folder``'s ``shards.json`` written by :func:`pack`, its recorded sha256 checked (one
    from before they were recorded is accepted); None when there is none or it is not one."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is damaged ({e}): pack into a new folder") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        return None
    if "contents_sha256" in manifest and _contents_sha256(manifest) != manifest[
            "contents_sha256"]:
        raise DataError(f"{path} is corrupt: its sha256 differs from the one recorded in it "
                        f"when it was written")
    return manifest


def manifest_classes(paths: list[Path]) -> tuple[str, ...] | None:
    """The class names recorded by :func:`pack` beside the shards, if any."""
    classes = (read_manifest(paths[0].parent) or {}).get("classes")
    return tuple(classes) if classes else None


# --- writing shards --------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    out: Path
    shards: int
    images: int
    resumed_from: int  # images already packed by an earlier, interrupted call
    prefix: str = "train"

    def summary(self) -> str:
        """What ``vqvae pack`` prints: what was packed, and the --data that trains on it."""
        again = ("" if not self.resumed_from else " (all packed before)"
                 if self.resumed_from == self.images
                 else f" (continued after {self.resumed_from})")
        return (f"packed {self.images} images{again} into {self.shards} shard(s): {self.out}\n"
                f"train on them: vqvae train --data '{self.out}/{self.prefix}-"
                f"{{{0:06d}..{self.shards - 1:06d}}}.tar'")


def pack(folder: str | Path, out: str | Path, shard_size: int = 2000, prefix: str = "train",
         progress: bool = True, write: Callable[[Path, bytes], None] | None = None) -> Packed:
    """Write the images below ``folder`` (sorted; labels from first-level sub-folders) into tar
    shards of ``shard_size`` images each under ``out``, the files' bytes unchanged.

    Each shard is written to a temporary name and renamed when complete, and ``shards.json``
    records the finished ones, so an interrupted call continues where it stopped (a killed call's
    temporary files are removed first); a folder that
    changed since then is an error rather than a mix of two listings.
    """
    from ..fileio import write_bytes

    write = write or write_bytes
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    files, labels, classes = folder_files(folder)
    listing = hashlib.sha256(b"\n".join(files.paths.tolist())).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f".{prefix}-*.tmp*"), *out.glob(f".{MANIFEST}.tmp*")]:
        if stale.is_file():  # a killed pack's temporary shard, index or manifest
            stale.unlink(missing_ok=True)
    manifest = _read_manifest(out, listing, shard_size, prefix, len(files))
    done = sum(s["count"] for s in manifest["shards"])
    total_shards = -(-len(files) // shard_size)
    with tqdm(total=len(files), initial=done, desc="packing", unit="img",
              disable=not progress) as bar:  # closed on Ctrl-C too
        for shard in range(len(manifest["shards"]), total_shards):
            name = f"{prefix}-{shard:06d}.tar"
            rows = range(shard * shard_size, min((shard + 1) * shard_size, len(files)))
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i in rows:
                    suffix = Path(files.name(i)).suffix.lower()
                    _add(tar, f"{i:09d}{suffix}", files.read(i))
                    if labels is not None:
                        _add(tar, f"{i:09d}.cls", str(int(labels[i])).encode())
            buffer.seek(0)
            with tarfile.open(fileobj=buffer, mode="r:") as tar:
                samples = _scan(tar, out / name)
            index = {"kind": INDEX_KIND, "format": 1, "tar_bytes": buffer.getbuffer().nbytes,
                     "samples": samples}
            index_bytes = json.dumps(index).encode()
            write(out / (name + INDEX_SUFFIX), index_bytes)
            write(out / name, buffer.getvalue())
            manifest["shards"].append({"name": name, "count": len(rows),
                                       "sha256": sha256(buffer.getvalue()),
                                       "index_sha256": sha256(index_bytes)})
            write(out / MANIFEST, _seal(manifest))
            bar.update(len(rows))
    manifest["classes"] = list(classes) if classes is not None else None
    write(out / MANIFEST, _seal(manifest))
    return Packed(out, total_shards, len(files), done, prefix)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _read_manifest(out: Path, listing: str, shard_size: int, prefix: str, n: int) -> dict:
    path = out / MANIFEST
    fresh = {"kind": MANIFEST_KIND, "format": 1, "listing_sha256": listing, "images": n,
             "shard_size": shard_size, "prefix": prefix, "classes": None, "shards": []}
    if not path.exists():
        if any(out.glob(f"{prefix}-*.tar")):
            raise DataError(f"{out} already holds {prefix}-*.tar shards but no {MANIFEST}: pack "
                            f"into an empty folder")
        return fresh
    manifest = read_manifest(out)
    if manifest is None:
        raise DataError(f"{path} is not a vqvae shards manifest")
    if (manifest.get("listing_sha256"), manifest.get("shard_size"),
            manifest.get("prefix")) != (listing, shard_size, prefix):
        raise DataError(f"{out} was packed from a different listing or with other options "
                        f"(the folder changed, or --shard-size/--prefix differ): pack into a new "
                        f"folder")
    for shard in manifest["shards"]:  # finished shards must still be there, whole
        if not (out / shard["name"]).is_file():
            raise DataError(f"{out / shard['name']} is missing: pack into a new folder")
        if "sha256" in shard and sha256((out / shard["name"]).read_bytes()) != shard["sha256"]:
            raise DataError(f"{out / shard['name']} is corrupt: its sha256 differs from the one "
                            f"recorded in {path}: pack into a new folder")
    return manifest


def shard_groups(shard_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each shard's samples, in tar order: one (n_s,) array per shard id."""
    order = np.argsort(shard_ids, kind="stable")
    bounds = np.searchsorted(shard_ids[order], np.arange(int(shard_ids.max()) + 2))
    return [order[bounds[s]:bounds[s + 1]] for s in range(len(bounds) - 1)]


def _permutation(n: int, *key: int) -> torch.Tensor:
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + part) % (1 << 62)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def epoch_plan(groups: list[np.ndarray], seed: int, epoch: int, reader: int,
               readers: int) -> list[np.ndarray]:
    """The samples one of ``readers`` reads in ``epoch``, shard by shard.

    The epoch's shard order is a seeded permutation; with at least as many shards as readers
    each reader takes every ``readers``-th shard of it (whole shards: sequential reads), else
    every reader walks all shards and takes every ``readers``-th sample. Within a shard the
    samples come in a seeded order. The readers' plans are disjoint and together cover the epoch.
    """
    order = _permutation(len(groups), seed, epoch).tolist()
    if len(groups) >= readers:
        return [groups[s][_permutation(len(groups[s]), seed, epoch, s + 1).numpy()]
                for s in order[reader::readers]]
    plan, position = [], 0
    for s in order:
        rows = groups[s][_permutation(len(groups[s]), seed, epoch, s + 1).numpy()]
        mine = rows[(np.arange(len(rows)) + position) % readers == reader]
        position += len(rows)
        plan.append(mine)
    return plan
