import pytest
import torch

from vqvae import VQVAEConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> VQVAEConfig:
    return VQVAEConfig(image_size=8, in_channels=1, hidden_channels=8, downsamples=2, res_blocks=1,
                       codebook_size=16, code_dim=8)
