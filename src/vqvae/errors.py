"""Every exception and warning class of the package, in one place at the bottom layer.

Each error means bad input or a stopped run, never a bug: the CLI prints its message as one line
(exit 2, or 1 for a run that diverged or an unwritable disk) instead of a traceback.
"""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the problem."""


class DataError(ValueError):
    """A data source is missing, empty or malformed; the message says which and why."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or belongs to another model."""


class RunLockedError(CheckpointError):
    """Another live process holds the run folder."""


class PerceptualWeightsError(ValueError):
    """A perceptual-loss weights file is missing, unreadable or not shaped like LPIPS-VGG16."""


class PeerError(RuntimeError):
    """Another rank failed (its own message says why); this one stops too instead of hanging."""


class NonFiniteError(FloatingPointError):
    """Training diverged (a NaN or infinite loss or weight); nothing non-finite was saved."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which checkpoints first): the command stops as Ctrl-C
    stops it, and exits 143 instead of 130."""


class SkippedImagesWarning(UserWarning):
    """Some image files could not be decoded and were left out."""


# What the CLI reports as one line with exit status 2 (bad input) or 1 (a run that diverged).
USER_ERRORS = (ConfigError, DataError, CheckpointError, PerceptualWeightsError, PeerError,
               FileExistsError)
