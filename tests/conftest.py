"""Fixtures for every test (tests/README.md). The tiny command-line settings the tests train with
are a module, tests/tiny.py: module constants and spawned workers use them too."""

import shutil
from pathlib import Path

import pytest
import torch

from vqvae import VQVAEConfig

# Tiny tensors gain nothing from intra-op threads, and on a busy machine OpenMP's barriers make
# every small op wait milliseconds for a descheduled worker (seen: 400x slower sampling tests).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked ``cuda`` (``pytest -m cuda`` runs them alone) are skipped without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m cuda` where a GPU is")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> VQVAEConfig:
    return VQVAEConfig(image_size=8, in_channels=1, hidden_channels=8, downsamples=2, res_blocks=1,
                       codebook_size=16, code_dim=8)


LEGACY_RUN = Path(__file__).parent / "fixtures" / "legacy_run"  # written by main at 3659d9a
LEGACY_ROOT = "/tmp/legacy/run"  # where it was written (its configs and keep marks say so)


@pytest.fixture
def legacy_run(tmp_path: Path) -> Path:
    """A copy of the legacy run folder (stage 1, with an autoregressive prior in ``prior/`` and a
    maskgit prior in ``maskgit/``), its recorded root rewritten to the copy's place as a user
    moving a run folder would."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, run)
    for path in run.rglob("*.json"):
        path.write_text(path.read_text().replace(LEGACY_ROOT, str(run)))
    return run
