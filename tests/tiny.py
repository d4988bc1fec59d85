"""The tiny command-line settings the tests train with, written once: a stage-1 autoencoder on
8x8 digits and a one-layer prior, each a few seconds on a CPU core.

A module, not conftest fixtures: module constants, helpers outside tests and the workers that
tests/e2e/test_distributed.py spawns use them too, and fixtures reach test functions only. A test
that needs other settings writes the difference, ``stage1(size=16, every=None)``, not a new list.
"""

STAGE1 = ("--data", "digits", "--size", "8", "--hidden-channels", "16", "--code-dim", "8",
          "--codebook-size", "16", "--batch-size", "16", "--every", "15", "--eval-count", "64")
PRIOR = ("--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "16",
         "--every", "10", "--eval-count", "64")


def edit(options, **changes) -> list[str]:
    """``options`` with each change made: ``size=16`` sets ``--size`` where it stands (appended
    if absent), ``every=None`` removes ``--every`` and its value, ``flip=True`` is a bare
    ``--flip``. Give fractions as text (``lr="2e-3"``) to keep the command line as written."""
    out = list(options)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            at = out.index(flag)
            bare = at + 1 == len(out) or out[at + 1].startswith("--")
            del out[at:at + (1 if bare else 2)]
            if value is not None:
                out[at:at] = [flag] if value is True else [flag, str(value)]
        elif value is True:
            out.append(flag)
        elif value is not None:
            out += [flag, str(value)]
    return out


def stage1(**changes) -> list[str]:
    """STAGE1 with ``changes`` made (see ``edit``)."""
    return edit(STAGE1, **changes)


def prior(**changes) -> list[str]:
    """PRIOR with ``changes`` made (see ``edit``)."""
    return edit(PRIOR, **changes)


# The 16-pixel model with 8 channels that the loss tests (GAN, frequency, L1) train on.
STAGE1_16PX = tuple(stage1(size=16, hidden_channels=8, code_dim=4, batch_size=8, every=4,
                           eval_count=32, device="cpu"))
