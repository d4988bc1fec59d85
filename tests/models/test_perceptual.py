"""The perceptual loss: LPIPS's invariants on random weights, the loader's checks, torchvision's
key layout and the conversion script."""

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vqvae import LPIPS, PerceptualWeightsError, load_perceptual
from vqvae.models.lpips import LIN_SHA256, unit_normalize

from tests.script_module import load_script

# torchvision's vgg16().features: (index, in, out) of its 13 convolutions, written out here
# independently of the module so that a naming slip in either shows up.
TORCHVISION_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
                     (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512),
                     (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
LIN_CHANNELS = [64, 128, 256, 512, 512]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A randomly initialised LPIPS's state dict, with random non-negative lin weights."""
    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.uniform_(0.1, 1.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def lpips(weights) -> LPIPS:
    return load_perceptual(weights)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)


def test_loads_what_was_saved_frozen(lpips, state):
    loaded = lpips.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in lpips.parameters())
    assert not lpips.training


def test_identical_images_are_at_distance_zero(lpips, pair):
    x, _ = pair
    d = lpips(x, x.clone())
    assert d.shape == (2,) and d.dtype == torch.float32 and torch.equal(d, torch.zeros(2))


def test_distance_is_positive_and_symmetric(lpips, pair):
    x, y = pair
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.isfinite(d).all()
    assert torch.equal(d, lpips(y, x))
    assert torch.allclose(lpips(x[1:], y[1:]), d[1:], rtol=1e-5)  # per image, not per batch


def test_gradient_reaches_the_images_not_the_weights(lpips, pair):
    x, y = pair
    x = x.clone().requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_grayscale_is_rgb_repeated(lpips):
    x, y = torch.rand(2, 1, 1, 16, 16) * 2 - 1
    d = lpips(x, y)
    assert d.shape == (1,) and d.item() > 0
    assert torch.equal(d, lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_small_images_are_upsampled_to_16_pixels(lpips):
    x16 = torch.rand(1, 3, 16, 16) * 2 - 1
    taps = lpips.features(lpips.prepare(x16))  # 16 px needs no upsampling: relu5_3 is 1x1
    assert [t.shape[-1] for t in taps] == [16, 8, 4, 2, 1]
    assert [t.shape[1] for t in taps] == LIN_CHANNELS
    x, y = torch.rand(2, 2, 1, 8, 8) * 2 - 1
    d = lpips(x, y)  # 8 px -> 16 px, the smallest integer factor that defines every tap

    def up(t):
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

    assert torch.equal(d, lpips(up(x), up(y))) and (d > 0).all()
    assert lpips.prepare(torch.zeros(1, 1, 5, 40)).shape == (1, 3, 20, 160)  # aspect kept


def test_fp32_under_bf16_autocast(lpips, pair):
    x, y = (t.bfloat16() for t in pair)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips(x, y)
    assert d.dtype == torch.float32 and torch.equal(d, lpips(x.float(), y.float()))


def test_stays_in_eval_when_a_parent_trains(lpips):
    parent = nn.ModuleDict({"decoder": nn.Conv2d(3, 3, 1), "perceptual": lpips})
    parent.train()
    assert parent["decoder"].training and not any(m.training for m in lpips.modules())


def test_unit_normalize():
    g = torch.randn(3, 8, 2, 2)
    assert torch.allclose(unit_normalize(g).norm(dim=1), torch.ones(3, 2, 2))
    lpips_form = g / (g.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    assert torch.allclose(unit_normalize(g), lpips_form, rtol=1e-6, atol=0)
    f = torch.zeros(1, 4, 2, 2, requires_grad=True)  # every ReLU off at every position
    unit_normalize(f).sum().backward()
    assert torch.equal(unit_normalize(f), f.detach()) and torch.isfinite(f.grad).all()


def test_rejects_bad_input_shapes(lpips):
    with pytest.raises(ValueError, match="one shape"):
        lpips(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="1 or 3"):
        lpips(torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16))


# --- the loader ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="not found.*convert_lpips"):
        load_perceptual(tmp_path / "absent.safetensors")


def test_not_safetensors_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return marker.touch, ()

    path = tmp_path / "vgg.pth"
    path.write_bytes(pickle.dumps({"features.0.weight": Payload()}))
    with pytest.raises(PerceptualWeightsError, match="not a readable safetensors file"):
        load_perceptual(path)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("features.28.bias"), "1 expected tensor.*missing, e.g. features.28.bias"),
    (lambda s: s.update({"lins.2.weight": torch.ones(1, 128, 1, 1)}),
     r"lins.2.weight has shape \(1, 128, 1, 1\), expected \(1, 256, 1, 1\)"),
    (lambda s: s.update({"classifier.0.weight": torch.ones(2, 2)}),
     "unexpected tensor.*classifier.0.weight"),
    (lambda s: s.update({"lins.0.weight": -torch.ones(1, 64, 1, 1)}), "lins.0.weight.*negative"),
    (lambda s: s.update({"features.0.bias": torch.ones(64, dtype=torch.int32)}), "floats"),
])
def test_names_what_is_wrong(state, tmp_path, change, message):
    broken = dict(state)
    change(broken)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(PerceptualWeightsError, match=message) as info:
        load_perceptual(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.fixture(scope="module")
def torchvision_features() -> dict[str, torch.Tensor]:
    """Tensors named and shaped as torchvision's vgg16().state_dict()'s ``features``."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i, cin, cout in TORCHVISION_CONVS:
        out[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
        out[f"features.{i}.bias"] = torch.randn(cout, generator=gen) * 0.01
    return out


def test_torchvision_names_load(torchvision_features, tmp_path):
    lins = {f"lins.{k}.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LIN_CHANNELS)}
    path = tmp_path / "tv.safetensors"
    save_file({**torchvision_features, **lins}, str(path))
    model = load_perceptual(path)
    for i, _, _ in TORCHVISION_CONVS:
        assert torch.equal(model.features[i].weight, torchvision_features[f"features.{i}.weight"])
    assert torch.equal(model.lins[4].weight, lins["lins.4.weight"])


# --- scripts/convert_lpips.py --------------------------------------------------------------------


def _convert_script():
    return load_script("scripts/convert_lpips.py")


def test_convert_script(torchvision_features, tmp_path, capsys):
    vgg = {**torchvision_features, "classifier.6.bias": torch.zeros(1000)}  # dropped on the way
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LIN_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    out = tmp_path / "out" / "lpips.safetensors"
    script = _convert_script()
    assert script.main(["--vgg", str(tmp_path / "vgg16-397923af.pth"),
                        "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "is not torchvision's" in captured.err  # made-up file
    tensors = load_file(str(out))
    assert set(tensors) == set(torchvision_features) | {f"lins.{k}.weight" for k in range(5)}
    assert torch.equal(tensors["lins.3.weight"], lin["lin3.model.1.weight"])
    assert torch.equal(load_perceptual(out).features[28].bias, vgg["features.28.bias"])
    with safe_open(str(out), "pt") as f:  # a changed value under the converter's metadata
        meta = f.metadata()
    tensors["features.0.bias"][3] += 1e-3
    save_file(tensors, str(out), metadata=meta)
    with pytest.raises(PerceptualWeightsError, match="is corrupt: its weights' sha256"):
        load_perceptual(out)
    del lin["lin4.model.1.weight"]
    torch.save(lin, tmp_path / "vgg.pth")
    with pytest.raises(SystemExit, match="--lin file has no lin4.model.1.weight"):
        script.main(["--vgg", str(tmp_path / "vgg16-397923af.pth"),
                     "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)])


def test_weights_not_from_the_published_vgg16_are_warned_about(state, tmp_path):
    """Names and shapes cannot tell trained weights from random ones: the converter's record of
    its source files is checked (torchvision's file is vgg16-397923af.pth, named by its sha256)."""
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with pytest.warns(UserWarning, match="records no source files"):
        load_perceptual(plain)
    other = tmp_path / "other.safetensors"
    save_file(state, str(other), metadata={"vgg_sha256": "0" * 64, "lin_sha256": "1" * 64})
    with pytest.warns(UserWarning, match="not torchvision's vgg16-397923af.pth"):
        load_perceptual(other)
    other_lin = tmp_path / "other_lin.safetensors"
    save_file(state, str(other_lin), metadata={"vgg_sha256": "397923af" + "0" * 56,
                                               "lin_sha256": "1" * 64})
    with pytest.warns(UserWarning, match="lin layers that are not LPIPS v0.1's published"):
        load_perceptual(other_lin)
    published = tmp_path / "published.safetensors"
    save_file(state, str(published), metadata={"vgg_sha256": "397923af" + "0" * 56,
                                               "lin_sha256": LIN_SHA256})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_perceptual(published)
