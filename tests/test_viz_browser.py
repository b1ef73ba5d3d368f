"""End to end in a real browser: `python -m abm.viz` serves the page, headless Chromium
(Debian's /usr/bin/chromium driven by Playwright, no browser download) opens it, presses
Step, and checks that the step counter, the plots and the agent panel follow."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, SCENARIOS

from abm.viz.draw import network_png
from abm.viz.model import VizModel

CHROMIUM = Path("/usr/bin/chromium")
# flags that keep Chromium quiet and self-contained on CI machines (no sandbox as root,
# no GPU, no background connections that otherwise get refused in bulk)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCENARIO = SCENARIOS / "small_world_rules.toml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium "
        "(apt-get install chromium; .ci/run installs it)",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


@pytest.fixture
def server(tmp_path):
    """`python -m abm.viz` on a free port; yields (url, process); stops it afterwards."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 (the server writes it until stopped)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "abm.viz", str(SCENARIO), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while fetch(url + "/")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not come up:\n{log.read()}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        print(log.read())
        log.close()


def test_step_in_a_real_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    url, proc = server
    # the address is printed, and a second server on the same port is refused in one line
    port = url.rsplit(":", 1)[1]
    second = subprocess.run(
        [sys.executable, "-m", "abm.viz", "--port", port],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and "already in use" in second.stderr
    assert "Traceback" not in second.stderr
    # Solara serves its front end from /_solara/cdn: from the solara-assets package
    # offline, else fetched from a CDN; say which file is missing rather than time out
    page_html = fetch(url + "/")[1].decode()
    for asset in re.findall(r'src="(/_solara/cdn/[^"]+)"', page_html):
        status = fetch(url + asset)[0]
        assert status == 200, (
            f"the server cannot serve {asset} (HTTP {status}): offline, Solara's front end "
            "comes from the solara-assets package, which needs ipyvuetify < 2 "
            "(pip install 'ipyvuetify<2' solara-assets)"
        )

    # the same model in this process gives the pixel position of an agent to click
    model = VizModel(scenario=str(SCENARIO))
    _, hits = network_png(model)
    target = 42
    x, y = (float(c) for c in hits.xy[target])

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            page.goto(url + "/")
            step = page.get_by_role("button", name="Step", exact=True)
            step.wait_for(timeout=60_000)
            counter = page.locator(".abm-step")
            assert counter.inner_text() == "Step 0 of 50"
            plot = page.locator(".abm-timeseries")
            plot.wait_for()
            before = plot.screenshot()
            for i in range(1, 4):
                step.click()
                page.locator(".abm-step", has_text=f"Step {i} of 50").wait_for(timeout=60_000)
            assert counter.inner_text() == "Step 3 of 50"
            page.get_by_text("Step: 3", exact=True).wait_for()  # Mesa's own counter
            page.locator(".abm-busy").wait_for(state="detached")  # progress cleared
            after = plot.screenshot()
            assert after != before
            page.locator("img.abm-network").click(position={"x": x, "y": y})
            title = page.locator(".abm-agent-title")
            title.wait_for(timeout=30_000)
            label = model.labels[int(model.label_of_node[target])]
            assert title.inner_text().startswith(f"Agent {target}: {label}")
            shot = tmp_path / "viz.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert proc.poll() is None  # still serving
