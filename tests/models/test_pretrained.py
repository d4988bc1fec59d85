"""save_pretrained -> from_pretrained gives the same model (weights and outputs) for the
autoencoder and both priors; saved folders are checkpoint folders; older folders load.

Hub repo ids go through huggingface_hub, here offline from a fake cache, never the network.
"""

import socket
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import vqvae
from vqvae import CheckpointError, Prior, PriorConfig, VQVAE, VQVAEConfig
from vqvae.config import ConfigError
from vqvae.models.maskgit import MaskGITPrior

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy_run"
STEP = "checkpoints/step-0000004"
FILES = {"model.safetensors", "config.json", "README.md"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"

RESNET = dict(image_size=8, in_channels=1, hidden_channels=8, downsamples=1, res_blocks=1,
              codebook_size=16, code_dim=4)
VQGAN = dict(image_size=8, in_channels=3, architecture="vqgan", hidden_channels=8,
             channel_mult=(1, 2), downsamples=1, res_blocks=1, attention=True, norm_groups=4,
             codebook_size=16, code_dim=4)
AUTOENCODERS = {"resnet-vq": RESNET, "resnet-fsq": {**RESNET, "quantizer": "fsq"},
                "vqgan-ema": {**VQGAN, "quantizer": "ema"},
                "vqgan-fsq": {**VQGAN, "quantizer": "fsq"}}
PRIORS = {"gpt": dict(variant="gpt"), "seed-conditional": dict(variant="seed", num_classes=3),
          "maskgit": dict(variant="maskgit"),
          "maskgit-conditional": dict(variant="maskgit", num_classes=3)}


def autoencoder(name: str) -> VQVAE:
    model = VQVAE(VQVAEConfig(**AUTOENCODERS[name]))
    model.train()(torch.rand(4, model.cfg.in_channels, 8, 8) * 2 - 1)  # BN and EMA buffers move
    return model.eval()


def prior(name: str) -> torch.nn.Module:
    cfg = PriorConfig(codebook_size=16, height=3, width=4, d_model=16, layers=1, heads=2,
                      **PRIORS[name])
    return Prior.from_config(cfg).eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The model's output on a fixed input (eval mode, so deterministic)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, VQVAE):
            return model(torch.rand(2, model.cfg.in_channels, 8, 8, generator=g) * 2 - 1)[0]
        cfg = model.cfg
        tokens = torch.randint(0, cfg.codebook_size + 1, (2, cfg.height * cfg.width), generator=g)
        labels = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None
        return model(tokens, labels)


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b) and a.cfg == b.cfg and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(outputs(a), outputs(b))


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_an_autoencoder_round_trips(tmp_path, name):
    model = autoencoder(name)
    folder = model.save_pretrained(tmp_path / "ae", card={"data": "digits 8x8",
                                                          "metrics": {"psnr": 21.5}})
    assert {p.name for p in folder.iterdir()} == FILES
    assert_same(model, VQVAE.from_pretrained(folder))
    assert_same(model, vqvae.from_pretrained(folder))
    assert_same(model, vqvae.load_autoencoder(folder))  # a checkpoint folder too
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vqvae\ntags: [vqvae, ")
    h, w = model.encode(torch.zeros(1, model.cfg.in_channels, 8, 8)).indices.shape[1:]
    for words in ("| codes K | 16 |", f"| code grid h x w | {h} x {w} |", "digits 8x8",
                  "| psnr | 21.5 |", f"| quantizer | {model.cfg.quantizer} |",
                  f'vqvae.from_pretrained("{folder}")'):
        assert words in card


@pytest.mark.parametrize("name", PRIORS)
def test_a_prior_round_trips_as_its_own_class(tmp_path, name):
    model = prior(name)
    assert isinstance(model, MaskGITPrior if "maskgit" in name else Prior)
    folder = model.save_pretrained(tmp_path / "p")
    assert {p.name for p in folder.iterdir()} == FILES
    assert_same(model, type(model).from_pretrained(folder))
    assert_same(model, Prior.from_pretrained(folder))  # the variant picks the class
    assert_same(model, vqvae.from_pretrained(str(folder)))
    assert_same(model, vqvae.load_prior(folder))
    card = (folder / "README.md").read_text()
    assert "| codes K | 16 |" in card and "| code grid h x w | 3 x 4 |" in card
    assert f"| variant | {model.cfg.variant} |" in card and "Not recorded." in card


@pytest.mark.parametrize("run, cls", [("", VQVAE), ("prior", Prior), ("maskgit", MaskGITPrior)])
def test_folders_written_by_older_code_load(tmp_path, run, cls):
    step = FIXTURE / run / STEP
    loaded = (VQVAE if cls is VQVAE else Prior).from_pretrained(step)
    assert type(loaded) is cls and type(vqvae.from_pretrained(FIXTURE / run)) is cls
    saved = st.load_file(str(step / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    assert_same(loaded, cls.from_pretrained(loaded.save_pretrained(tmp_path / "again")))


def test_wrong_kinds_and_corrupt_weights_are_one_line_errors(tmp_path):
    priors = prior("gpt").save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="holds a 'prior' checkpoint, not 'vqvae'") as e:
        VQVAE.from_pretrained(priors)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="'gpt' prior, not a maskgit one") as e:
        MaskGITPrior.from_pretrained(priors)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        VQVAE.from_pretrained(FIXTURE)  # a run folder: vqvae.from_pretrained finds its latest
    folder = autoencoder("resnet-vq").save_pretrained(tmp_path / "ae")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1  # still a readable safetensors file, with another weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its sha256 differs"):
        VQVAE.from_pretrained(folder)
    with pytest.raises(ConfigError, match="unknown key"):
        prior("gpt").save_pretrained(tmp_path / "x", card={"dataset": "digits"})
    assert not (tmp_path / "x").exists()


def fake_hub(tmp_path: Path, monkeypatch) -> Path:
    """An offline Hub whose cache is in ``tmp_path`` (the layout huggingface_hub reads)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    # huggingface_hub read the environment when it was imported: set what it read, too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_a_repo_id_loads_from_the_hub_cache_offline(tmp_path, monkeypatch, no_network):
    model = autoencoder("vqgan-fsq")
    model.save_pretrained(fake_hub(tmp_path, monkeypatch))
    assert_same(model, VQVAE.from_pretrained("org/name"))
    assert_same(model, vqvae.from_pretrained("org/name"))
    with pytest.raises(CheckpointError, match="org/missing is no local folder, and the Hub") as e:
        VQVAE.from_pretrained("org/missing")
    assert "\n" not in str(e.value)


def test_a_repo_id_without_the_hub_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(CheckpointError, match=r"pip install 'vqvae\[hub\]'"):
        vqvae.from_pretrained("org/name")
    with pytest.raises(CheckpointError, match=r"pip install 'vqvae\[hub\]'"):
        prior("gpt").push_to_hub("org/name")


def test_push_to_hub_uploads_the_saved_folder(monkeypatch, no_network):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, *, exist_ok=False, private=None):
            calls.append(("create_repo", repo_id, exist_ok, private))

        def upload_folder(self, *, repo_id, folder_path, commit_message=None):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            calls.append(("upload_folder", repo_id, files))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    model = prior("maskgit")
    url = model.push_to_hub("org/name", card={"metrics": {"bits_per_code": 2.5}}, private=True,
                            token="t")
    assert url == "https://huggingface.co/org/name/commit/abc"
    assert calls[:2] == [("init", "t"), ("create_repo", "org/name", True, True)]
    (_, repo_id, files), = calls[2:]
    assert repo_id == "org/name" and set(files) == FILES
    card = files["README.md"].decode()
    assert 'vqvae.from_pretrained("org/name")' in card and "| bits_per_code | 2.5 |" in card
