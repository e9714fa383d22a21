"""The demo in a real browser: `python -m unilip.demo` serves tiny models on a free local port, a headless Chromium
driven by Playwright uses the page as a person would, and what the page shows is checked against the library.

Needs the demo extra (`pip install -e ".[demo]"`: Gradio, Playwright) and a Chromium found by path (Debian's
`apt-get install -y chromium`; Playwright's own browser download is not needed). `UNILIP_DEMO_SCREENSHOTS=<dir>`
also writes the screenshots of each tab there (docs/demo/ holds the committed ones).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.demo_helpers import RUN_STEPS, grid_image, log_run, loss_at, make_run, photo_file, save_tokenizers
from tests.demo_page import (
    choose,
    fill,
    gallery,
    plotted,
    screenshot,
    served_image,
    tab,
    upload,
    wait_for_points,
    wait_for_text,
)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_INSTALL = "apt-get install -y chromium"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
PROMPT = "a red motorcycle parked in a garage"
SAMPLING = {"seed": "7", "steps": "3", "cfg": "4.5", "count": "2", "size": "56"}


def _chromium() -> str | None:
    found = os.environ.get("UNILIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found or next((path for path in CHROMIUM_PATHS if os.path.exists(path)), None)


pytest.importorskip("gradio", reason='the demo extra is not installed: pip install -e ".[demo]"')
sync_api = pytest.importorskip(
    "playwright.sync_api", reason='the demo extra is not installed: pip install -e ".[demo]"'
)
if _chromium() is None:
    pytest.skip(f"no Chromium found (looked for chromium on PATH and {CHROMIUM_PATHS}): {CHROMIUM_INSTALL}",
                allow_module_level=True)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "unilip.pipelines.generate", *argv]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_config):
    """Tiny models on disk, `python -m unilip.demo` serving them, and the generate CLI's images for the same
    settings (its processes run while the demo starts)."""
    from tests.internvl_helpers import tiny_internvl_with_processor
    from unilip.export import main as export_main
    from unilip.models import UniLIPTokenizer
    from unilip.models.toy import save_toy_generator

    root = tmp_path_factory.mktemp("demo")
    first, second = save_tokenizers(root, tiny_config)
    generator = save_toy_generator(root / "toy", num_queries=8, seed=0)
    run = make_run(root / "runs" / "demo" / "tokenizer" / "stage1")
    (root / "runs" / "live" / "samples").mkdir(parents=True)  # where the slow test trains while the page watches
    photo = photo_file(root / "astronaut.png")
    torch.manual_seed(0)
    base = tiny_internvl_with_processor(UniLIPTokenizer(tiny_config), root / "internvl-base")
    export_main(["--tokenizer", str(second), "--base", str(base), "--out", str(root / "internvl")])

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    folders = [first, second, generator, root / "internvl", root / "runs"]
    server = subprocess.Popen(
        [sys.executable, "-m", "unilip.demo", *map(str, folders), "--port", str(port), "--refresh", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    settings = ["--seed", SAMPLING["seed"], "--steps", SAMPLING["steps"], "--guidance-scale", SAMPLING["cfg"],
                "--size", SAMPLING["size"], "--generator", str(generator), "--device", "cpu"]  # fmt: skip
    cli_runs = {
        "t2i": _cli(["t2i", "--prompt", PROMPT, "--prompt", PROMPT, "--out", str(root / "cli" / "t2i.png"), *settings]),
        "edit": _cli(["edit", "--image", str(photo), "--instruction", "make it black and white",
                      "--out", str(root / "cli" / "edit.png"), *settings]),
    }  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("unilip demo: http") for line in lines):
            assert server.poll() is None, "the demo exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "the demo did not start in 180 s:\n" + "".join(lines)
            time.sleep(0.2)
        for name, process in cli_runs.items():
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, f"generate CLI ({name}) failed:\n{output}"
        yield {"url": f"http://127.0.0.1:{port}/", "root": root, "run": run, "photo": photo, "lines": lines,
               "tokenizers": (first, second), "generator": generator, "internvl": root / "internvl"}  # fmt: skip
    finally:
        for process in (server, *cli_runs.values()):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(served["url"], wait_until="domcontentloaded")
    page.wait_for_selector("#rec-run")
    yield page
    context.close()


def _label(path: Path) -> str:
    """What the page calls a folder: its last two path components (unique among these)."""
    return "/".join(path.parts[-2:])


def _library_reconstruction(tokenizer_dir: Path, photo: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation loader's image and the tokenizer's reconstruction of it, 8-bit: what the page must show."""
    from unilip.data.transforms import SampleTransform
    from unilip.evaluation.protocols import reconstruct
    from unilip.pretrained.tokenizer import load_tokenizer

    crop = SampleTransform(size, train=False)({"png": photo.read_bytes(), "__key__": "photo"}, None)["image"]
    images = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        recon = reconstruct(load_tokenizer(tokenizer_dir).eval(), images).images.clamp(0, 1)
    return crop, (recon[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_the_demo_binds_to_this_machine_and_says_so(served):
    (line,) = [line for line in served["lines"] if line.startswith("unilip demo:")]
    assert "127.0.0.1" in line and "only this machine" in line
    port = int(re.search(r":(\d+) ", line)[1])
    with pytest.raises(OSError), socket.create_connection((_external_address(), port), timeout=2):
        pass  # nothing answers on the machine's other addresses


def test_a_port_in_use_is_one_error_line(served):
    from unilip.demo.cli import main

    port = served["url"].rstrip("/").rsplit(":", 1)[1]
    with pytest.raises(SystemExit, match=rf"^error: cannot serve on 127\.0\.0\.1:{port} .*choose another --port$"):
        main([str(served["tokenizers"][0]), "--port", port])


def _external_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no address besides the loopback")
    return address


def test_reconstruct_shows_the_library_reconstruction_of_an_upload_beside_a_second_tokenizer(page, served, tmp_path):
    first, second = served["tokenizers"]
    upload(page, "rec", served["photo"])
    choose(page, "#rec-tokenizer-2", _label(second))
    page.click("#rec-run")
    page.wait_for_selector("#rec-recon-b img")
    crop, expected = _library_reconstruction(first, served["photo"], 224)
    shown = served_image(page, "#rec-recon-a img")
    assert shown.shape == (224, 224, 3)
    assert np.array_equal(served_image(page, "#rec-original img"), crop)
    assert np.array_equal(shown, expected)
    _, expected_second = _library_reconstruction(second, served["photo"], 224)
    assert np.array_equal(served_image(page, "#rec-recon-b img"), expected_second)
    assert not np.array_equal(expected, expected_second)
    # PSNR of the shown pair by hand (the float reconstruction's, so to within the 8-bit rounding)
    mse = np.mean((crop / 255.0 - expected / 255.0) ** 2)
    psnr = float(re.search(r"PSNR \(dB\)\s+([\d.]+)", page.locator("#rec-metrics-a").inner_text())[1])
    assert abs(psnr - 10 * np.log10(1 / mse)) < 0.05
    # the original encoder is its own teacher; the moved one is measured against it, and is below 1
    cosines = [page.locator(f"#rec-metrics-{s}").inner_text() for s in "ab"]
    assert "1.0000" in cosines[0] and "1.0000" not in cosines[1] and str(first) in cosines[1]
    assert np.array_equal(served_image(page, "#rec-diff-a img").shape, (224, 224, 3))
    screenshot(page, "reconstruct", tmp_path)


def test_reconstruct_at_the_256_protocol(page, served):
    from unilip.evaluation.protocols import reconstruct
    from unilip.pretrained.tokenizer import load_tokenizer

    first, _ = served["tokenizers"]
    upload(page, "rec", served["photo"])
    page.get_by_label("256 (protocol)").check()
    page.get_by_label("reference").check()
    page.click("#rec-run")
    page.wait_for_selector("#rec-recon-a img")
    shown = served_image(page, "#rec-recon-a img")
    crop = served_image(page, "#rec-original img")
    assert shown.shape == crop.shape == (256, 256, 3)
    images = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        recon = reconstruct(load_tokenizer(first).eval(), images, "reference").images.clamp(0, 1)
    assert np.array_equal(shown, (recon[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_a_broken_upload_and_a_missing_checkpoint_are_messages_in_the_page(page, served, tmp_path):
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    page.locator("#rec-upload input[type=file]").set_input_files(str(broken))
    page.click("#rec-run")
    text = wait_for_text(page, "#rec-message", "could not be read|upload an image")
    if "upload an image" in text:  # clicked before the upload had arrived
        page.click("#rec-run")
        text = wait_for_text(page, "#rec-message", "could not be read")
    assert "Upload a JPEG, PNG or WebP image" in text and "Traceback" not in page.content()
    assert page.locator("[data-testid=toast-body]").count() == 0  # no Gradio error notice either
    # a run that is training and has not written a checkpoint yet
    choose(page, "#rec-photo", "astronaut")
    choose(page, "#rec-tokenizer", _label(served["run"]))
    page.click("#rec-run")
    text = wait_for_text(page, "#rec-message", "checkpoints/last.ckpt")
    assert str(served["run"]) in text


def _cli_image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_gives_the_generate_clis_images_and_their_settings(page, served, tmp_path):
    tab(page, "Generate")
    page.locator("#gen-prompt textarea").fill("x" * 200)
    page.click("#gen-run")
    text = wait_for_text(page, "#gen-message", "tokens long")
    assert "at most 128" in text and "Shorten it" in text
    page.locator("#gen-prompt textarea").fill(PROMPT)
    fill(page, "gen", SAMPLING)
    page.click("#gen-run")
    shown = gallery(page, "gen", 2)
    cli = served["root"] / "cli"
    expected = [_cli_image(cli / "t2i_0.png"), _cli_image(cli / "t2i_1.png")]
    assert [image.shape for image in shown] == [(56, 56, 3)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(shown, expected, strict=True))
    assert not np.array_equal(expected[0], expected[1])
    # the downloads: each PNG and settings.json carry the settings and the command that reproduces them
    links = page.locator("#gen-files a").evaluate_all("els => els.map(e => e.href)")
    settings = json.loads(page.request.get(next(link for link in links if link.endswith("settings.json"))).body())
    assert (settings["prompt"], settings["seed"], settings["steps"], settings["count"]) == (PROMPT, 7, 3, 2)
    assert "python -m unilip.pipelines.generate t2i --prompt" in settings["command"]
    assert "--seed 7 --steps 3 --guidance-scale 4.5 --size 56" in settings["command"]
    png = Image.open(io.BytesIO(page.request.get(next(link for link in links if link.endswith("_1.png"))).body()))
    assert json.loads(png.text["unilip"])["index"] == 1
    assert np.array_equal(np.asarray(png.convert("RGB")), expected[1])
    assert page.locator("#gen-command textarea").input_value() == settings["command"]
    screenshot(page, "generate", tmp_path)


def test_edit_gives_the_generate_clis_edit(page, served, tmp_path):
    tab(page, "Edit")
    upload(page, "edit", served["photo"])
    page.locator("#edit-prompt textarea").fill("make it black and white")
    fill(page, "edit", {**SAMPLING, "count": "1"})
    page.click("#edit-run")
    (shown,) = gallery(page, "edit", 1)
    assert np.array_equal(shown, _cli_image(served["root"] / "cli" / "edit.png"))
    assert np.array_equal(served_image(page, "#edit-source img"), _cli_image(served["photo"]))
    screenshot(page, "edit", tmp_path)


def test_understand_answers_with_the_exported_checkpoint(page, served, tmp_path):
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    from unilip.data.samples import load_photo

    tab(page, "Understand")
    choose(page, "#und-photo", "cat")
    page.locator("#und-question textarea").fill("What animal is this?")
    fill(page, "und", {"tokens": "6"})
    page.click("#und-run")
    page.wait_for_selector("#und-image img")
    shown = page.locator("#und-answer textarea").input_value()
    # the same question through transformers directly
    processor = AutoProcessor.from_pretrained(served["internvl"])
    model = InternVLForConditionalGeneration.from_pretrained(served["internvl"]).eval()
    content = [{"type": "image", "image": load_photo("cat")}, {"type": "text", "text": "What animal is this?"}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert shown == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    screenshot(page, "understand", tmp_path)


def _assert_draws(points: list[tuple[float, float]], data: list[tuple[int, float]]) -> None:
    """The pixels are an axis-aligned linear map of the data (x right with the step, y up with the value)."""
    steps, values = np.array(data, dtype=float).T
    xs, ys = np.array(points).T
    for pixels, data_axis, sign in ((xs, steps, 1), (ys, values, -1)):
        slope, intercept = np.polyfit(data_axis, pixels, 1)
        assert np.sign(slope) == sign
        assert np.abs(slope * data_axis + intercept - pixels).max() < 0.01  # Vega writes 3 decimals


def test_the_run_viewer_draws_a_run_and_follows_it_while_it_trains(page, served, tmp_path):
    tab(page, "Run viewer")
    points = wait_for_points(page, RUN_STEPS)
    _assert_draws(points, [(step, loss_at(step)) for step in range(RUN_STEPS)])
    assert "loss/total" in page.locator("#run-plot").inner_html()  # the y axis names the metric
    assert np.array_equal(served_image(page, "#run-grid img"), np.asarray(grid_image(RUN_STEPS - 1)))
    screenshot(page, "runs", tmp_path)
    # the run goes on: five more steps and a grid, read by the page on its own (it re-reads every second)
    log_run(served["run"], range(RUN_STEPS, RUN_STEPS + 5))
    points = wait_for_points(page, RUN_STEPS + 5)
    _assert_draws(points, [(step, loss_at(step)) for step in range(RUN_STEPS + 5)])
    page.wait_for_function("document.querySelector('#run-caption').innerText.includes('step 14')")
    assert np.array_equal(served_image(page, "#run-grid img"), np.asarray(grid_image(RUN_STEPS + 4)))
    # another metric, and an older grid
    choose(page, "#run-metric", "val/psnr")
    points = wait_for_points(page, 3)
    _assert_draws(points, [(4, 12.0), (9, 14.5), (14, 17.0)])


@pytest.mark.slow
def test_the_run_viewer_follows_a_real_training_run(page, served, photos_dir):
    """train.py (the quick start, 12 steps, validation every 4) writes into a run folder the page is showing."""
    from tests.conftest import quick_overrides
    from tests.helpers import run_tree

    run = served["root"] / "runs" / "live"
    overrides = quick_overrides(photos_dir, run, "stage=1", "stages.stage1.max_steps=12",
                                "data.train_batches_per_epoch=4", "loss.perceptual_weight=0")  # fmt: skip
    tab(page, "Run viewer")
    choose(page, "#run-run", "runs/live")
    seen: list[int] = []

    def train() -> None:
        command = [sys.executable, "train.py", *overrides]
        seen.append(run_tree(command, cwd=REPO, env=dict(os.environ), timeout=600).returncode)

    training = threading.Thread(target=train)
    training.start()
    counts = set()
    while training.is_alive():  # what the page draws while the run trains
        if page.locator("#run-plot g.mark-line path").count():
            counts.add(len(plotted(page)))
        time.sleep(0.5)
    training.join()
    assert seen == [0]
    rows = [(step, value) for step, value in _logged(run, "loss/total")]
    assert len(rows) == 12 and len(counts - {0, 12}) >= 1  # it showed the run part-way, then all of it
    _assert_draws(wait_for_points(page, 12), rows)
    page.wait_for_function("document.querySelector('#run-caption').innerText.includes('step 12')")
    final = Image.open(run / "samples" / "reconstruction_step0000012.png").convert("RGB")
    assert np.array_equal(served_image(page, "#run-grid img"), np.asarray(final))


def _logged(run: Path, metric: str) -> list[tuple[int, float]]:
    import csv

    with open(run / "logs" / "metrics.csv") as file:
        return [(int(row["step"]), float(row[metric])) for row in csv.DictReader(file) if row.get(metric)]
