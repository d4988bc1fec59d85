"""``python -m vqvae`` and the ``vqvae`` command: :func:`vqvae.cli.main`, with Ctrl-C while it
starts (importing torch) one line and exit 130, not a traceback."""

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("vqvae: interrupted while starting", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
