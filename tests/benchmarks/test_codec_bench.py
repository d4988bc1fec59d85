"""benchmarks/codec.py's own logic: the set mosaic comes apart into its images, classic codecs'
bytes are read at our quality between the qualities around it, and a classic codec's point
decodes what it encoded."""

import math

import torch

from tests.script_module import load_script

bench = load_script("benchmarks/codec.py")


def test_the_mosaic_comes_apart_into_its_images():
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    grid, cols = bench.mosaic(images)
    assert grid.shape == (3, 3 * 4, 3 * 4) and cols == 3
    assert torch.equal(grid[:, 4:8, 0:4], images[3])
    assert torch.equal(bench.unmosaic(grid, 7, 4, cols), images)


def test_bytes_at_our_quality_are_interpolated_in_log_bytes():
    points = [{"psnr": 20.0, "image_bytes": 100.0}, {"psnr": 30.0, "image_bytes": 400.0}]
    assert math.isclose(bench.at_ours(points, 25.0, "psnr", "image_bytes"), 200.0)
    assert bench.at_ours(points, 19.0, "psnr", "image_bytes") is None
    cell = bench.ratio_cell(points, {"psnr": 19.0, "image_bytes": 50.0}, "psnr", "image_bytes")
    assert cell == "at its lowest, 20 dB: 2.00x"


def test_a_lossless_classic_point_decodes_what_it_encoded():
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    size, decoded = bench.classic_bytes(images[0], "PNG", None)
    assert size > 0 and torch.equal(decoded, images[0])
    (point,) = bench.classic_points(images, "PNG")
    assert point["ssim"] == 1.0 and point["set_ssim"] == 1.0
