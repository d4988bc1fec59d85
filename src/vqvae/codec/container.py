"""The compressed file: a small binary header (magic number, version, model fingerprints, image
and grid sizes, how the grids were coded), each image's checksum, the coded streams and a CRC-32
of the whole file.

Layout, in order (integers as LEB128 varints unless sized): ``VQVC``, version (1 byte), flags (1
byte: labels coded, names stored, prior path stored), prior and stage-1 fingerprints (8 bytes
each), image size, channels, grid height, width, codebook size, images, batch size, steps,
intra-op threads, the device kind the probabilities were computed on (0 CPU, 1 CUDA, 2 MPS), then
the prior path and the names (each a varint length and UTF-8 / zlib bytes, when flagged), each
stream's length in 32-bit words, each image's CRC-32 (4 bytes), the streams, and the file's CRC-32.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from ..errors import DataError

MAGIC = b"VQVC"
VERSION = 1
LABELLED, NAMED, PATHED = 1, 2, 4  # flag bits
DEVICES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Header:
    """What a decoder needs besides the streams: which models, what shapes, how coded."""

    prior: bytes  # 8-byte fingerprints of the prior's and the stage-1 model's weights
    stage1: bytes
    image_size: int
    channels: int
    grid: tuple[int, int]
    codebook_size: int
    images: int
    batch_size: int
    steps: int
    threads: int  # the intra-op threads and device kind the probabilities were computed with
    device: str
    labelled: bool = False
    prior_path: str = ""  # where the prior run was when compressed ("": not recorded)


@dataclass(frozen=True)
class Container:
    header: Header
    checksums: list[int]
    streams: list[bytes]
    names: list[str] = field(default_factory=list)  # [] when none were stored

    def payload_bytes(self) -> int:
        """Bytes of the coded streams alone (the rest is the header)."""
        return sum(len(s) for s in self.streams)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    """Reads the fields back in order; running past the end is a truncated file."""

    def __init__(self, data: bytes, name: str):
        self.data, self.at, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise DataError(f"{self.name} is truncated")
        self.at += n
        return self.data[self.at - n:self.at]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
            if shift > 63:
                raise DataError(f"{self.name} is corrupt (a size field runs on)")


def pack(container: Container) -> bytes:
    """The file's bytes."""
    h = container.header
    flags = ((LABELLED if h.labelled else 0) | (NAMED if container.names else 0)
             | (PATHED if h.prior_path else 0))
    out = bytearray(MAGIC + bytes([VERSION, flags]) + h.prior + h.stage1)
    device = DEVICES.index(h.device) if h.device in DEVICES else len(DEVICES)
    for value in (h.image_size, h.channels, *h.grid, h.codebook_size, h.images, h.batch_size,
                  h.steps, h.threads, device):
        out += _varint(value)
    if h.prior_path:
        path = h.prior_path.encode()
        out += _varint(len(path)) + path
    if container.names:
        names = zlib.compress("\n".join(container.names).encode(), 9)
        out += _varint(len(names)) + names
    for stream in container.streams:
        out += _varint(len(stream) // 4)
    out += struct.pack(f"<{len(container.checksums)}I", *container.checksums)
    for stream in container.streams:
        out += stream
    return bytes(out + struct.pack("<I", zlib.crc32(out)))


def unpack(data: bytes, name: str = "the file") -> Container:
    """Parse and check a file written by :func:`pack`: a wrong magic number, a newer version, a
    truncated or corrupted file is a one-line :class:`DataError`."""
    if data[:4] != MAGIC:
        raise DataError(f"{name} is not a vqvae compressed file (no {MAGIC.decode()} magic)")
    if len(data) < 6:
        raise DataError(f"{name} is truncated")
    if data[4] != VERSION:
        raise DataError(f"{name} is format version {data[4]}; this vqvae reads version "
                        f"{VERSION}")
    if len(data) < 26 or struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
        raise DataError(f"{name} is corrupt or truncated (its CRC-32 does not match)")
    read = _Reader(data[:-4], name)
    flags = read.take(6)[5]
    prior, stage1 = read.take(8), read.take(8)
    size, channels, gh, gw, k, images, batch, steps, threads, device = (
        read.varint() for _ in range(10))
    path = read.take(read.varint()).decode("utf-8", "replace") if flags & PATHED else ""
    names = []
    if flags & NAMED:
        try:
            names = zlib.decompress(read.take(read.varint())).decode("utf-8").split("\n")
        except (zlib.error, UnicodeDecodeError):
            raise DataError(f"{name} is corrupt (its image names do not unpack)") from None
        if len(names) != images:
            raise DataError(f"{name} is corrupt ({len(names)} names for {images} images)")
    if batch < 1:
        raise DataError(f"{name} is corrupt (batch size 0)")
    lengths = [read.varint() for _ in range(-(-images // batch))]
    checksums = list(struct.unpack(f"<{images}I", read.take(4 * images)))
    streams = [read.take(4 * n) for n in lengths]
    if read.at != len(read.data):
        raise DataError(f"{name} is corrupt ({len(read.data) - read.at} bytes left over)")
    header = Header(prior, stage1, size, channels, (gh, gw), k, images, batch, steps, threads,
                    DEVICES[device] if device < len(DEVICES) else "other",
                    bool(flags & LABELLED), path)
    return Container(header, checksums, streams, names)
