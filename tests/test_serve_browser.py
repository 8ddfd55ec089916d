"""`convlens serve` end to end in real headless Chromium (Debian's), driven by Playwright for Python.

Skipped only when no Chromium executable can be found; Gradio and Playwright come with the `serve` extra
(`make test` installs them), so their absence is a failure, not a skip.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.data.images import package_photos_dir
from test_serve import png_bomb  # the tests folder is on sys.path (pytest's default import mode)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# Debian chromium as root in a closed network (see the machine notes): no sandbox, no GPU, no background traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CATS = ("tabby", "tiger cat", "Egyptian cat")
UPLOAD_LIMIT_MB = 1


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CONVLENS_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium executable found (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """`convlens serve` in a subprocess on a free loopback port; yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "convlens", "serve", "--model", str(trained_run),
                                 "--port", str(port), "--threads", "1", "--steps", "30",
                                 "--max-upload-mb", str(UPLOAD_LIMIT_MB)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"convlens serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"convlens serve did not start:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def watch(page, url: str) -> dict:
    """Record every request leaving the server's origin and every console error or page error."""
    seen = {"external": [], "errors": []}
    origin = url.rstrip("/")

    def on_request(request):
        if not request.url.startswith((origin, "data:", "blob:")):
            seen["external"].append(request.url)

    page.on("request", on_request)
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(f"{m.text} @ {m.location.get('url')}"))
    page.on("pageerror", lambda e: seen["errors"].append(f"page error: {e}"))
    return seen


def top_label(page, timeout_s: float = 60) -> str:
    """The predicted class shown by the Draw tab's probability list, once there is one."""
    value = page.locator("#draw-probs [data-testid='label-output-value']")
    value.wait_for(timeout=timeout_s * 1000)
    return value.inner_text().strip()


def draw_one(page) -> None:
    """A '1': one vertical stroke with the mouse, in small steps, on the sketchpad."""
    page.locator("#sketch button[aria-label='Brush']").click()
    box = page.locator("#sketch canvas").first.bounding_box()
    x, y0, length = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.15, box["height"] * 0.7
    page.mouse.move(x + 6, y0)
    page.mouse.down()
    for i in range(31):
        page.mouse.move(x + 6 - 12 * i / 30, y0 + length * i / 30)
    page.mouse.up()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    seen = watch(page, url)
    page.goto(url, wait_until="load")
    page.locator("#sketch button[aria-label='Brush']").wait_for(timeout=60_000)
    return page, seen


def upload(page, path: Path) -> None:
    """Upload a file in the Photo tab (clearing the previous upload first, as a user would)."""
    page.get_by_role("tab", name="Photo").click()
    field = page.locator("#photo-upload input[type=file]")
    if field.count() == 0:
        page.locator("#photo-upload button[aria-label='Clear']").click()
    field.set_input_files(str(path))


def test_serve_in_chromium(server, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    noise = tmp_path / "noise.png"  # incompressible: over the upload limit in bytes
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > UPLOAD_LIMIT_MB * 1e6
    bomb = tmp_path / "bomb.png"  # 1 kB on disk, 900 megapixels in its header
    bomb.write_bytes(png_bomb(30_000, 30_000))
    photos = package_photos_dir()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page, seen = open_page(browser, server)

            # Draw: a mouse-drawn 1 is read as 1; maps, feature maps and rank overlays appear
            draw_one(page)
            assert top_label(page) == "1"
            expect(page.locator("#draw-maps img")).to_have_count(3, timeout=30_000)
            expect(page.locator("#draw-ranks img")).to_have_count(3)
            for layer in ("l1", "l2", "l3"):
                expect(page.locator(f"#draw-features-{layer} img")).to_have_count(1)
            screenshot = tmp_path / "serve.png"
            page.screenshot(path=str(screenshot), full_page=True)

            # a failing method (CAM: the lab network has no GAP head) shows its error; the others still show
            page.locator("#draw-methods label", has_text="cam").first.click()
            expect(page.locator("#draw-errors")).to_contain_text("cam failed", timeout=30_000)
            expect(page.locator("#draw-errors")).to_contain_text("global-average-pooling")
            expect(page.locator("#draw-maps img")).to_have_count(3)

            # Photo: chelsea.png uploaded → a cat in the top 5, both default maps, the .npz offered
            upload(page, photos / "chelsea.png")
            expect(page.locator("#photo-top")).to_contain_text("tiger cat", timeout=90_000)
            assert any(cat in page.locator("#photo-top").inner_text() for cat in CATS)
            expect(page.locator("#photo-maps img")).to_have_count(2, timeout=30_000)
            expect(page.locator("#photo-npz")).to_contain_text("maps_", timeout=30_000)

            # two tabs at once: each gets its own answer
            page2, seen2 = open_page(browser, server)
            upload(page2, photos / "coffee.png")
            second = page.locator("#photo-target label").nth(1)
            second_name = second.inner_text().rsplit(" (", 1)[0]
            second.click()
            expect(page2.locator("#photo-top")).to_contain_text("espresso", timeout=90_000)
            expect(page.locator("#photo-maps")).to_contain_text(f"gradcam: {second_name}", timeout=90_000)
            assert "espresso" not in page.locator("#photo-top").inner_text()
            assert not any(cat in page2.locator("#photo-top").inner_text() for cat in CATS)

            # Activation maximization: computed on demand, then from the cache
            page2.get_by_role("tab", name="Activation maximization").click()
            page2.locator("#actmax-go").click()
            expect(page2.locator("#actmax-info")).to_contain_text("computed now", timeout=120_000)
            page2.locator("#actmax-go").click()
            expect(page2.locator("#actmax-info")).to_contain_text("from the cache", timeout=60_000)
            expect(page2.locator("#actmax-image img")).to_have_count(1)

            # Statistics: the table of the first layer's nine filters for class 0
            page2.get_by_role("tab", name="Statistics").click()
            expect(page2.locator("#stats-table")).to_contain_text("win rate", timeout=30_000)
            cells = [c for c in page2.locator("#stats-table").inner_text().split() if c.strip()]
            numbers = [c for c in cells if c.lstrip("-").replace(".", "", 1).isdigit()]
            assert len(numbers) == 9 * 7  # 9 filters × (rank, filter, score, std, contrast, win rate, max)

            # a decompression bomb is refused with a message in the page, and the app keeps serving
            upload(page2, bomb)
            expect(page2.get_by_text("refused without decoding")).to_be_visible(timeout=60_000)
            upload(page2, photos / "chelsea.png")
            expect(page2.locator("#photo-top")).to_contain_text("tiger cat", timeout=90_000)

            assert seen["errors"] == [] and seen2["errors"] == [], seen["errors"] + seen2["errors"]

            # over the byte limit: Gradio refuses the upload and says so in the page
            upload(page, noise)
            expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=30_000)
            # Gradio's client logs the refused upload itself (a 404 for its progress, then the response)
            assert all("upload_progress" in e or e.startswith("Response") for e in seen["errors"]), seen["errors"]

            assert seen["external"] == [] and seen2["external"] == [], seen["external"] + seen2["external"]
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    target = os.environ.get("CONVLENS_SCREENSHOT_DIR")
    if target:
        shutil.copy(screenshot, Path(target) / "serve.png")
