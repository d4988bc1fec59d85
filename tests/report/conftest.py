"""Fixtures of the report tests: the legacy run folder (stage 1 with two priors inside) copied
once, its files' checksums taken, and its report written once for every test that reads it."""

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import LEGACY_ROOT, LEGACY_RUN
from vqvae import write_report


def checksums(folder: Path, skip: str = "report.html") -> dict[str, str]:
    """Every file under ``folder`` (but ``skip``) -> the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != skip}


def copy_legacy(root: Path) -> Path:
    """A copy of the legacy run folder with its recorded root rewritten to the copy's place."""
    run = root / "run"
    shutil.copytree(LEGACY_RUN, run)
    for path in run.rglob("*.json"):
        path.write_text(path.read_text().replace(LEGACY_ROOT, str(run)))
    return run


@pytest.fixture(scope="session")
def reported(tmp_path_factory):
    """(run folder, its checksums before the report, the report's path)."""
    run = copy_legacy(tmp_path_factory.mktemp("report"))
    before = checksums(run)
    return run, before, write_report(run, device="cpu", progress=False)
