import pytest
import torch

from vqvae import VQVAEConfig

# Tiny tensors gain nothing from intra-op threads, and on a busy machine OpenMP's barriers make
# every small op wait milliseconds for a descheduled worker (seen: 400x slower sampling tests).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> VQVAEConfig:
    return VQVAEConfig(image_size=8, in_channels=1, hidden_channels=8, downsamples=2, res_blocks=1,
                       codebook_size=16, code_dim=8)
