"""The demo's computations without a browser (tests/test_demo_browser.py drives the page): what it shows is
eval.py's reconstruction and metrics and the generate CLI's images; folders are recognised, runs read while they
are written; mistakes are messages. And the demo adds nothing to the training path: it all imports without Gradio."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.demo_helpers import RUN_STEPS, log_run, loss_at, make_run, photo_file, save_tokenizers
from unilip.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BLOCK_GRADIO = "import sys; sys.modules['gradio'] = None; sys.modules['playwright'] = None\n"  # import -> ImportError


def _python(code: str, *, timeout: float = 300) -> subprocess.CompletedProcess:
    from tests.helpers import run_tree

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return run_tree([sys.executable, "-c", BLOCK_GRADIO + textwrap.dedent(code)], cwd=REPO, env=env, timeout=timeout)


def test_unilip_and_train_py_work_without_gradio_and_never_import_the_demo():
    result = _python(
        """
        import importlib, runpy
        from pathlib import Path
        import unilip
        package = Path(unilip.__file__).parent
        names = sorted(".".join(("unilip", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
                       for p in package.rglob("*.py") if p.name != "__main__.py")  # fmt: skip
        training = [n for n in names if not n.startswith("unilip.demo")]
        for name in training:
            importlib.import_module(name)
        assert not [n for n in sys.modules if n.startswith("unilip.demo")], "the training path imported the demo"
        for name in names:  # the demo's own modules too: Gradio is imported only when the page is built
            importlib.import_module(name)
        assert sys.modules["gradio"] is None
        print("imported", len(names))
        for argv in (["--help"], ["experiment=quickstart", "stage=1", "--cfg", "job"]):
            sys.argv = ["train.py", *argv]
            try:
                runpy.run_path("train.py", run_name="__main__")
            except SystemExit as stop:
                assert stop.code in (0, None), stop.code
        """
    )
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and "Powered by Hydra" in result.stdout  # train.py --help
    assert "TokenizerTraining" in result.stdout  # the composed config, printed by train.py --cfg job


def test_the_demo_without_gradio_names_the_install_command(tmp_path, tiny_config):
    first, _ = save_tokenizers(tmp_path, tiny_config)
    result = _python(f"import runpy; sys.argv = ['unilip-demo', {str(first)!r}]; runpy.run_module('unilip.demo')")
    assert (
        result.returncode == 1
        and 'error: the demo needs Gradio, an optional extra: pip install -e ".[demo]"' in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_folders_are_recognised_and_labelled(tmp_path, tiny_config):
    from unilip.demo.sources import find_sources
    from unilip.models.toy import save_toy_generator

    first, second = save_tokenizers(tmp_path, tiny_config)
    generator = save_toy_generator(tmp_path / "toy", num_queries=8, seed=0)
    run = make_run(tmp_path / "runs" / "demo" / "tokenizer" / "stage1")
    sources = find_sources([first, second, generator, tmp_path / "runs"])
    name = tmp_path.name
    assert sources.tokenizer == {f"{name}/tokenizer-stage1": first, f"{name}/tokenizer-stage2": second,
                                 "tokenizer/stage1": run}  # fmt: skip
    assert sources.generator == {"toy/generator": generator}
    assert sources.run == {"tokenizer/stage1": run} and sources.internvl == {}
    (tmp_path / "empty").mkdir()
    for path, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no runs")]:
        with pytest.raises(ConfigError, match=message):
            find_sources([path])


def test_the_command_line_refuses_what_it_cannot_show_in_one_line(tmp_path):
    from unilip.demo.cli import announce, main

    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'missing'} does not exist"):
        main([str(tmp_path / "missing")])
    assert "only this machine can open it" in announce("127.0.0.1", 7860)
    assert "only this machine" in announce("::1", 7860) and "only this machine" in announce("localhost", 7860)
    assert "anyone who can reach this machine on port 7860" in announce("0.0.0.0", 7860)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tiny_config):
    return save_tokenizers(tmp_path_factory.mktemp("tokenizers"), tiny_config)


@pytest.mark.parametrize(("size", "resize"), [(224, "project"), (256, "reference")])
def test_the_reconstruction_and_metrics_are_eval_pys(tokenizers, tmp_path, size, resize):
    from skimage.metrics import structural_similarity

    from unilip.data.transforms import SampleTransform
    from unilip.demo.reconstruct import evaluation_input, load_evaluated_tokenizer, reconstruct_pixels
    from unilip.evaluation.protocols import reconstruct
    from unilip.pretrained.tokenizer import load_tokenizer

    first, second = tokenizers
    data = photo_file(tmp_path / "photo.png").read_bytes()
    pixels = evaluation_input(data, size)
    crop = SampleTransform(size, train=False)({"png": data, "__key__": "x"}, None)["image"]  # the evaluation loader
    assert np.array_equal(pixels, crop)
    images = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    out = reconstruct_pixels(load_evaluated_tokenizer(second, None, "cpu"), pixels, resize)
    with torch.no_grad():
        expected = reconstruct(load_tokenizer(second).eval(), images, resize).images.clamp(0, 1)
        cosine = F.cosine_similarity(
            load_tokenizer(second).features(images), load_tokenizer(first).features(images), dim=-1
        )
    assert np.array_equal(out.reconstruction, (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    a, b = images[0].permute(1, 2, 0).double().numpy(), expected[0].permute(1, 2, 0).double().numpy()
    assert out.psnr == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)), abs=1e-3)
    reference_ssim = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)  # fmt: skip
    assert out.ssim == pytest.approx(reference_ssim, abs=2e-4)
    assert out.feature_cosine == pytest.approx(float(cosine.mean()), abs=1e-5) and out.feature_cosine < 0.9999


def test_the_teacher_is_the_lineages_or_a_note_says_why_not(tokenizers, tmp_path, tiny_config):
    from unilip.demo.reconstruct import load_evaluated_tokenizer, reconstruct_pixels
    from unilip.models import UniLIPTokenizer

    first, _ = tokenizers
    original = load_evaluated_tokenizer(first, None, "cpu")  # stage 1: the encoder is its own original
    assert reconstruct_pixels(original, np.zeros((56, 56, 3), np.uint8)).feature_cosine == pytest.approx(1.0)
    UniLIPTokenizer(tiny_config).save_pretrained(
        tmp_path / "orphan", training={"stage": 2, "encoder_trained": True, "teacher": str(tmp_path / "gone")}
    )
    orphan = load_evaluated_tokenizer(tmp_path / "orphan", None, "cpu")
    assert orphan.teacher is None and "feature fidelity not measured" in orphan.notes[0]
    assert reconstruct_pixels(orphan, np.zeros((56, 56, 3), np.uint8)).feature_cosine is None


def test_a_run_without_a_checkpoint_yet_is_a_message(tmp_path):
    from unilip.demo.reconstruct import load_evaluated_tokenizer

    run = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"checkpoints/last\.ckpt"):
        load_evaluated_tokenizer(run, None, "cpu")


def test_images_that_do_not_decode_are_refused_with_the_fix(tmp_path):
    from unilip.demo.reconstruct import evaluation_input

    photo = photo_file(tmp_path / "photo.png").read_bytes()
    for data in (b"not an image", photo[: len(photo) // 2]):  # garbage, and a truncated PNG
        with pytest.raises(ValueError, match=r"could not be read.*Upload a JPEG, PNG or WebP image"):
            evaluation_input(data, 224)


def test_the_heat_map_scale():
    from unilip.demo.reconstruct import heat_map

    zeros = torch.zeros(1, 3, 2, 2)
    assert not heat_map(zeros, zeros).any()  # no error: black
    assert (heat_map(zeros, zeros + 0.25) == 255).all() and (heat_map(zeros, zeros + 0.9) == 255).all()  # white
    assert heat_map(zeros, zeros + 0.125)[0, 0].tolist() == [230, 60, 0]  # half way: the middle colour


@pytest.fixture(scope="module")
def toy_generator(tmp_path_factory):
    from unilip.models.toy import save_toy_generator

    return save_toy_generator(tmp_path_factory.mktemp("toy"), num_queries=8, seed=0)


def test_generated_and_edited_images_are_the_clis_and_their_download_reproduces_them(toy_generator, tmp_path):
    from unilip.demo import generate as gen
    from unilip.pipelines.generate import main as generate_main

    photo = photo_file(tmp_path / "photo.png")
    requests = [
        gen.Request("a red cube", seed=3, steps=3, count=2, size=56),
        gen.Request("make it blue", seed=4, steps=2, count=1, size=84, scheduler="euler", source=str(photo)),
    ]
    pipe = gen.load(gen.command(toy_generator, requests[0], "cpu", "float32"))
    for index, request in enumerate(requests):
        argv = gen.command(toy_generator, request, "cpu", "float32")
        images = gen.run(pipe, argv)
        paths = gen.write_downloads(images, request, argv, tmp_path / f"downloads{index}")
        settings = json.loads((tmp_path / f"downloads{index}" / "settings.json").read_text())
        command = shlex.split(settings["command"])
        assert command[:3] == ["python", "-m", "unilip.pipelines.generate"]
        out = tmp_path / f"cli{index}" / "image.png"
        written = generate_main([*command[3:-2], "--out", str(out)])  # the download's command, run
        assert len(written) == len(images) == request.count
        for pixels, cli_path, download in zip(images, written, paths, strict=False):
            assert np.array_equal(pixels, np.asarray(Image.open(cli_path)))
            assert np.array_equal(pixels, np.asarray(Image.open(download).convert("RGB")))
            assert json.loads(Image.open(download).text["unilip"])["seed"] == request.seed
    assert not np.array_equal(*gen.run(pipe, gen.command(toy_generator, requests[0], "cpu", "float32")))


def test_sampling_mistakes_are_messages(toy_generator, tmp_path):
    from unilip.demo import generate as gen

    pipe = gen.load(gen.command(toy_generator, gen.Request("x"), "cpu", "float32"))
    with pytest.raises(ValueError, match=r"the prompt is 200 tokens long; this generator reads at most 128"):
        gen.run(pipe, gen.command(toy_generator, gen.Request("x" * 200, steps=1, size=28), "cpu", "float32"))
    for request, message in [(gen.Request(" "), "write a prompt"), (gen.Request("x", count=9), "choose 1 to 8")]:
        with pytest.raises(ValueError, match=message):
            gen.command(toy_generator, request, "cpu", "float32")
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="no saved generator yet"):
        gen.generator_dir(tmp_path / "run")


def test_a_run_is_read_while_it_is_written(tmp_path):
    from unilip.demo.runs import default_metric, read_curves, read_grids

    run = make_run(tmp_path / "run")
    curves = read_curves(run)
    assert curves["loss/total"] == [(step, loss_at(step)) for step in range(RUN_STEPS)]
    assert curves["val/psnr"] == [(4, 12.0), (9, 14.5)]
    assert default_metric(sorted(curves)) == "loss/total"
    logged = (run / "logs" / "metrics.csv").read_text()
    (run / "logs" / "metrics.csv").write_text(logged + "0,,0.0")  # a row the logger is still writing
    assert read_curves(run)["loss/total"] == curves["loss/total"]
    (run / "logs" / "metrics.csv").write_text(logged)
    log_run(run, range(RUN_STEPS, RUN_STEPS + 5))  # the run goes on (the logger continues the file)
    assert len(read_curves(run)["loss/total"]) == RUN_STEPS + 5
    (run / "samples" / "generation_step0000003.png").write_bytes(b"")
    (run / "samples" / "generation_step0000003.txt").write_text("a cat\na dog\n")
    (run / "samples" / "notes.png").write_bytes(b"")
    grids = read_grids(run)
    assert [g.step for g in grids["reconstruction"]] == [4, 9, 14]
    assert [(g.step, g.caption) for g in grids["generation"]] == [(3, "a cat | a dog")]


def test_a_model_is_read_again_when_its_run_writes_newer_weights(tokenizers, tmp_path):
    import shutil

    from unilip.demo.sources import ModelCache

    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizers[0], folder)
    cache, loads = ModelCache(), []
    for _ in range(2):
        cache.get(("tokenizer", str(folder)), folder, lambda: loads.append(1) or len(loads))
    assert len(loads) == 1
    os.utime(folder / "model.safetensors", (1, 1))  # a newer checkpoint (any other time stamp)
    assert cache.get(("tokenizer", str(folder)), folder, lambda: loads.append(1) or len(loads)) == 2


def test_errors_are_messages_in_the_page_and_bugs_keep_their_traceback_in_the_log(caplog):
    from unilip.demo.app import guarded

    @guarded("message", ["image"])
    def handler(error):
        raise error

    assert handler(ValueError("the image could not be read")) == {
        "message": "**Error:** the image could not be read",
        "image": None,
    }
    assert "Internal error" in handler(KeyError("bug"))["message"]
    assert "KeyError: 'bug'" in caplog.text  # the traceback, in the terminal
