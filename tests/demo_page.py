"""Playwright steps on the demo's page that the browser tests share: switch a tab, fill and choose inputs, upload,
wait for text or a plot, and read back the pixels the page serves (always as lossless PNG)."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def screenshot(page, name: str, tmp_path: Path) -> None:
    """Every tab's screenshot from the real page (JPEG: the docs' copies stay small); also into
    $UNILIP_DEMO_SCREENSHOTS (docs/demo/) when set."""
    time.sleep(0.5)  # let the last layout settle (images fade in)
    shot = page.screenshot(full_page=True, type="jpeg", quality=80)
    assert Image.open(io.BytesIO(shot)).size[0] == 1400
    (tmp_path / f"{name}.jpg").write_bytes(shot)
    if os.environ.get("UNILIP_DEMO_SCREENSHOTS"):
        folder = Path(os.environ["UNILIP_DEMO_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(shot)


def served_image(page, selector: str) -> np.ndarray:
    """The pixels of an image as the page serves it: fetched from its <img src>, which must be a lossless PNG."""
    source = page.locator(selector).get_attribute("src")
    response = page.request.get(source)
    assert response.ok, source
    data = response.body()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{selector} is served as {data[:16]!r}, not PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_for_text(page, selector: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"{selector} shows {text!r}, expected /{pattern}/"
        time.sleep(0.2)


def upload(page, prefix: str, path: Path) -> None:
    page.locator(f"#{prefix}-upload input[type=file]").set_input_files(str(path))
    page.wait_for_selector(f"#{prefix}-upload img")  # uploaded: the preview shows


def choose(page, selector: str, option: str) -> None:
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill(page, prefix: str, values: dict[str, str]) -> None:
    for name, value in values.items():
        page.locator(f"#{prefix}-{name} input").fill(value)
        page.locator(f"#{prefix}-{name} input").press("Tab")


def gallery(page, prefix: str, count: int) -> list[np.ndarray]:
    page.wait_for_function(
        f"document.querySelectorAll('#{prefix}-gallery .thumbnail-item img, #{prefix}-gallery img').length >= {count}"
    )
    sources = page.locator(f"#{prefix}-gallery img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
    unique = list(dict.fromkeys(sources))  # the preview and its thumbnail show the same file
    return [fetch_png(page, source) for source in unique]


def fetch_png(page, source: str) -> np.ndarray:
    data = page.request.get(source).body()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{source} is served as {data[:16]!r}, not PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def plotted(page) -> list[tuple[float, float]]:
    """The vertices of the line the page draws (Vega's SVG path), in pixels."""
    path = page.locator("#run-plot g.mark-line path").first.get_attribute("d")
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", path)]


def wait_for_points(page, count: int, timeout: float = 30) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        points = plotted(page) if page.locator("#run-plot g.mark-line path").count() else []
        if len(points) == count:
            return points
        assert time.monotonic() < deadline, f"the plot has {len(points)} points, expected {count}"
        time.sleep(0.2)
