"""A real browser on a finished run's MLflow page: the user's view of `pipeline run`'s results.

Starts the MLflow UI exactly as the run printed it (on a free port), opens the printed link in headless
Chromium (Debian's package, driven by Playwright) and checks what a user looks for: the run in the
machine-learning view, its validation curve among the model metrics, and the loss-curve plot among its
artifacts, rendered."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request

import pytest
from ports import free_port

CHROMIUM_HINT = ("the browser test needs Chromium: `apt-get install chromium` (Debian; `make setup` does it when run "
                 "as root), or set CHROMIUM=/path/to/chrome; deselect it with -m 'not browser'")


def chromium() -> str:
    import os

    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(CHROMIUM_HINT)
    return path



def start_ui(stdout: str, cwd) -> tuple[subprocess.Popen, str]:
    """The printed `mlflow ui` command and run link, moved to a free port; returns (server, link)."""
    command = re.search(r"Open them with:\s+(.+)", stdout).group(1).split()
    link = re.search(r"browse the run: (\S+)", stdout).group(1)
    port = str(free_port())
    command[command.index("--port") + 1] = port
    link = link.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server, link
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"the MLflow UI ({' '.join(command)}) did not answer within 120 s")


def check_run_page(stdout: str, run_name: str, cwd) -> None:
    from playwright.sync_api import sync_playwright

    server, link = start_ui(stdout, cwd)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(link)
            page.get_by_text(run_name, exact=True).first.wait_for(timeout=60_000)
            # The machine-learning view ("Runs" in the breadcrumb), not MLflow 3's GenAI one ("Evaluations").
            page.get_by_role("link", name="Runs").first.wait_for(timeout=10_000)
            assert page.get_by_role("link", name="Evaluations").count() == 0
            page.get_by_text("Model metrics", exact=True).first.click()
            page.get_by_placeholder("Search metric charts").fill("val_loss")
            page.get_by_text("val_loss", exact=True).first.wait_for(timeout=30_000)  # the validation curve's chart
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("plots", exact=True).first.click()
            page.get_by_text("loss_curve.png", exact=True).first.click()
            page.get_by_text("plots/loss_curve.png").first.wait_for(timeout=30_000)  # the preview's title
            # The preview shows the PNG from a blob of the downloaded artifact: decoded, with its real size.
            page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete "
                                   "&& i.naturalWidth > 300)", timeout=30_000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
