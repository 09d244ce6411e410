"""Open a series in Orthanc's Web Viewer (Debian's `orthanc-webviewer`) in headless Chromium, as a reader would, and
save the image the viewer draws."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

VIEWPORT = {"width": 900, "height": 700}
# The spread of the drawn canvas's grey values; a viewer still loading draws one flat colour.
CANVAS_SPREAD = """() => {
    const canvas = document.querySelector('canvas');
    if (!canvas || canvas.width === 0) return 0;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let low = 255, high = 0;
    for (let i = 0; i < data.length; i += 4) { low = Math.min(low, data[i]); high = Math.max(high, data[i]); }
    return high - low;
}"""


class ViewerError(RuntimeError):
    """The viewer did not draw the series."""


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise ViewerError("Chromium is missing: run scripts/setup_pacs.sh (as root), which installs Debian's chromium")
    return found


def screenshot_series(
    orthanc_url: str,
    series_id: str,
    slices: int,
    path: Path,
    *,
    credentials: tuple[str, str] | None = None,
    timeout_s: float = 60,
) -> Path:
    """Open `series_id` in the Web Viewer, step to its middle slice with the keyboard on the slice slider, wait until
    the image is drawn and save the viewer's canvas as a PNG at `path`."""
    headers = {}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    arguments = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=arguments)
        try:
            page = browser.new_page(viewport=VIEWPORT, extra_http_headers=headers)
            page.goto(f"{orthanc_url}/web-viewer/app/viewer.html?series={series_id}")
            handle = page.locator("#slider .ui-slider-handle")
            handle.wait_for(timeout=timeout_s * 1000)
            handle.focus()
            for _ in range(slices // 2):
                page.keyboard.press("ArrowRight")
            deadline = time.monotonic() + timeout_s
            while page.evaluate(CANVAS_SPREAD) < 32:
                if time.monotonic() > deadline:
                    raise ViewerError(f"the viewer drew no image of series {series_id} within {timeout_s:g} s")
                time.sleep(0.25)
            time.sleep(1)  # the viewer refines the first drawing (quality levels)
            page.locator("canvas").first.screenshot(path=str(path))
        finally:
            browser.close()
    return path
