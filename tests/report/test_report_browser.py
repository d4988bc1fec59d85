"""The report in a real browser: Debian's headless Chromium renders the legacy run's page and
the test reads what it drew (a screenshot that is not blank, the atlas canvas painted), the DOM
after the page's script ran (every section, a selected code's neighbours) and its console (no
error). `.ci/run` installs chromium; without it these tests are skipped."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.report.test_report import SECTION_IDS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                                "(apt-get install chromium; .ci/run installs it)")


def render(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Chromium, headless and offline, on ``url``; its console messages go to stderr."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console(stderr: str) -> list[str]:
    """The page's console messages (an uncaught error among them) in Chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_page_renders_without_errors(reported, tmp_path):
    _, _, page = reported
    shot = tmp_path / "shot.png"
    done = render(page.as_uri(), tmp_path, "--window-size=1200,2400", f"--screenshot={shot}")
    assert not console(done.stderr), console(done.stderr)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50  # text, charts and pictures


def test_the_script_draws_the_atlas_and_selects_a_code(reported, tmp_path):
    _, _, page = reported
    done = render(page.as_uri() + "#code=3", tmp_path, "--dump-dom")
    assert not console(done.stderr), console(done.stderr)
    dom = done.stdout
    for key in SECTION_IDS:
        assert f'<section id="{key}"' in dom, key
    assert re.search(r'<body[^>]*data-ready="1"', dom)  # the script ran to its end
    assert re.search(r'<pre id="js-errors"></pre>', dom)
    painted = re.search(r'<canvas id="atlas-canvas"[^>]*data-painted="(\d+)"', dom)
    assert painted and int(painted.group(1)) > 1000
    selected = re.search(r'<div id="atlas-selected">(.*?)</div></div>', dom, re.S).group(1)
    assert "<b>code 3</b>" in selected and selected.count('class="nb"') == 8
    assert dom.count("<canvas") > 10  # the selected code's map, neighbours, usage maps
