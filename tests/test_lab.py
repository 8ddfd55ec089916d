"""End to end: `convlens lab --fast`, the report's content, and the page in headless Chromium."""
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from conftest import run_cli

SECTIONS = ["ex1", "ex2", "ex3", "faith", "record"]


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.scripts, self.links = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "link":
            self.links.append(attrs.get("href"))


def test_report_is_complete_and_self_contained(lab_dir):
    page = (lab_dir / "index.html").read_text()
    parser = Collector()
    parser.feed(page)
    assert all(s in parser.ids for s in SECTIONS)
    assert parser.scripts == 0 and not parser.links
    assert not re.search(r'src="(https?:)?//', page)
    assert len(parser.images) >= 20
    for src in parser.images:  # every image inlined: the page alone shows them all
        assert src.startswith("data:image/png;base64,"), src[:80]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.width > 0


def test_summary_agrees_with_page(lab_dir):
    summary = json.loads((lab_dir / "summary.json").read_text())
    page = (lab_dir / "index.html").read_text()
    metrics = json.loads((lab_dir / "train" / "metrics.json").read_text())
    assert summary["exercise1"]["test_accuracy"] == metrics["test_accuracy"]
    assert f"{metrics['test_accuracy']:.4f}" in page
    assert f"Chosen tv weight: <b>{summary['exercise2']['chosen_tv_weight']:g}</b>" in page
    for row in summary["exercise3"]["predictions"]:
        assert row["predicted"] in page
    assert summary["faithfulness"]["best_deletion"] in page
    assert summary["exercise1"]["parameters"] == 7465


def test_second_run_reuses_cached_stages(lab_dir):
    proc = run_cli("lab", "--fast", "--out", lab_dir, "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timings = json.loads((lab_dir / "summary.json").read_text())["run"]["timings"]
    assert all(timings[s]["cached"] for s in ("train", "featuremaps", "stats", "actmax", "explain", "evaluate"))


def test_interrupted_stage_runs_again(lab_dir):
    (lab_dir / "stats" / "stage.json").unlink()
    proc = run_cli("lab", "--fast", "--out", lab_dir, "--quiet", timeout=300)
    assert proc.returncode == 0
    timings = json.loads((lab_dir / "summary.json").read_text())["run"]["timings"]
    assert timings["stats"]["cached"] is False and timings["train"]["cached"] is True


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK_SCRIPT = """
const imgs = [...document.images];
const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
document.title = 'RESULT:' + JSON.stringify({total: imgs.length, broken: broken});
"""


@pytest.mark.browser
def test_page_in_headless_chromium(lab_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's package)")
    # a copy of the page with a checker appended, loaded eagerly, so the DOM dump tells what loaded
    page = (lab_dir / "index.html").read_text().replace('loading="lazy"', "")
    probe = lab_dir / "_probe.html"
    probe.write_text(page.replace("</body>", f"<script>window.onload=()=>{{{CHECK_SCRIPT}}}</script></body>"))
    try:
        common = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
        dump = subprocess.run([chromium, *common, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                              capture_output=True, text=True, timeout=120)
        match = re.search(r"<title>RESULT:(.*?)</title>", dump.stdout)
        assert match, dump.stderr[-2000:]
        result = json.loads(match.group(1).replace("&quot;", '"'))
        assert result["total"] >= 20 and result["broken"] == []
        # Chromium logs every console message (console.error included) as "INFO:CONSOLE…"; the page has none
        console = [line for line in dump.stderr.splitlines() if ":CONSOLE" in line]
        assert console == []
    finally:
        probe.unlink()
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", (lab_dir / "index.html").as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
    shutil.copy(shot, lab_dir / "screenshot.png")
