"""The demo's page: five tabs over the computations of `reconstruct`, `generate`, `understand` and `runs`.

Gradio is imported inside `build_app` only: nothing else in unilip needs it (`pip install -e ".[demo]"`). Every
handler turns a user's mistake (an image that does not decode, a prompt too long, a checkpoint that is not there)
into a message in the page; a bug in our code is a short notice there and its traceback in the terminal. Images go
to the page as PNG at their own size (Gradio's default, WebP, would change their pixels).
"""

from __future__ import annotations

import functools
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unilip.demo import generate as gen
from unilip.demo.reconstruct import SIZES, EvaluatedTokenizer, evaluation_input, load_evaluated_tokenizer, read_upload
from unilip.demo.sources import ModelCache, Sources
from unilip.errors import UserError, one_line

log = logging.getLogger(__name__)

NONE = "(none)"


@dataclass
class Options:
    device: str = "cpu"
    dtype: str = "float32"  # generator and InternVL weights (the CLI's --dtype); tokenizers run in float32
    preset: str | None = None  # the tokenizer preset of released .pth files
    refresh_seconds: float = 5.0  # how often the run viewer re-reads a run that is being followed
    downloads: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="unilip-demo-")))


def bundled_photos() -> list[str]:
    """The scikit-image photographs the quick start trains on (empty without scikit-image)."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return []
    from unilip.data.samples import PHOTOS

    return list(PHOTOS)


def _photo_bytes(name: str) -> bytes:
    from unilip.data.samples import load_photo

    out = io.BytesIO()
    load_photo(name).save(out, format="PNG")  # lossless: the photo's own pixels
    return out.getvalue()


def image_bytes(upload: dict | None, photo: str | None) -> bytes:
    """The bytes of the uploaded file (Gradio's raw payload), else of the chosen bundled photo."""
    if upload and upload.get("path"):
        return read_upload(upload["path"])
    if photo and photo != NONE:
        return _photo_bytes(photo)
    raise ValueError("upload an image or pick a bundled photo")


def guarded(message: Any, clear: list[Any]):
    """A handler returning {component: value} -> one that shows errors in `message` and empties `clear`."""

    def decorate(handler):
        @functools.wraps(handler)
        def wrapper(*args):
            try:
                return handler(*args)
            except (UserError, OSError, ValueError) as error:
                text = f"**Error:** {one_line(error)}"
            except Exception as error:  # a bug: the page says so, the terminal keeps the traceback
                log.exception("the demo failed")
                text = (
                    f"**Internal error** ({type(error).__name__}); the traceback is in the terminal running the demo."
                )
            return {message: text, **{component: None for component in clear}}

        return wrapper

    return decorate


def _dropdown_value(choices: list[str]) -> str | None:
    return choices[0] if choices else None


def build_app(sources: Sources, options: Options):
    """The Gradio Blocks of the demo (not launched)."""
    import gradio as gr

    from unilip.demo.viewer import build_run_viewer

    cache = ModelCache()
    photos = [NONE, *bundled_photos()]

    def tokenizer(label: str) -> EvaluatedTokenizer:
        if label not in sources.tokenizer:
            raise ValueError("choose a tokenizer (start the demo with a tokenizer run or saved tokenizer)")
        path = sources.tokenizer[label]
        load = functools.partial(load_evaluated_tokenizer, path, options.preset, options.device)
        return cache.get(("tokenizer", str(path)), path, load)

    with gr.Blocks(title="unilip demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# unilip\nTokenizers, generators and runs: " + (sources.summary() + f". Device: {options.device}.")
        )
        with gr.Tab("Reconstruct", id="reconstruct"):
            _reconstruct_tab(gr, sources, photos, tokenizer)
        with gr.Tab("Generate", id="generate"):
            _sampling_tab(gr, sources, photos, options, cache, edit=False)
        with gr.Tab("Edit", id="edit"):
            _sampling_tab(gr, sources, photos, options, cache, edit=True)
        with gr.Tab("Understand", id="understand"):
            _understand_tab(gr, sources, photos, options, cache)
        with gr.Tab("Run viewer", id="runs"):
            build_run_viewer(gr, app, sources, options.refresh_seconds)
    return app


def _image_inputs(gr, prefix: str, photos: list[str]):
    upload = gr.Image(label="Upload an image", type="filepath", sources=["upload"], elem_id=f"{prefix}-upload")
    photo = gr.Dropdown(photos, value=NONE, label="or a bundled photo", elem_id=f"{prefix}-photo")
    # one image at a time: choosing one clears the other
    photo.input(lambda name: None if name != NONE else gr.skip(), photo, upload)
    upload.upload(lambda _: NONE, upload, photo, preprocess=False)  # a broken file is reported by the handlers
    return upload, photo


def _reconstruct_tab(gr, sources: Sources, photos: list[str], tokenizer) -> None:
    from unilip.demo.reconstruct import reconstruct_pixels

    labels = list(sources.tokenizer)
    with gr.Row():
        with gr.Column(scale=1):
            upload, photo = _image_inputs(gr, "rec", photos)
        with gr.Column(scale=1):
            first = gr.Dropdown(labels, value=_dropdown_value(labels), label="Tokenizer", elem_id="rec-tokenizer")
            second = gr.Dropdown(
                [NONE, *labels], value=NONE, label="Second tokenizer, side by side", elem_id="rec-tokenizer-2"
            )
            size = gr.Radio(list(SIZES), value="224", label="Size (shorter edge, centre crop)", elem_id="rec-size")
            resize = gr.Radio(
                ["project", "reference"],
                value="project",
                label="protocol_resize (256 px: how the decoder output shrinks; eval.py's option)",
            )
            button = gr.Button("Reconstruct", variant="primary", elem_id="rec-run")
    message = gr.Markdown(elem_id="rec-message")
    with gr.Row():
        original = gr.Image(label="Original", format="png", interactive=False, elem_id="rec-original")
        columns = []
        for suffix in ("a", "b"):
            with gr.Column():
                recon = gr.Image(label="Reconstruction", format="png", interactive=False, elem_id=f"rec-recon-{suffix}")
                diff = gr.Image(
                    label="|difference|, 0 to 0.25", format="png", interactive=False, elem_id=f"rec-diff-{suffix}"
                )
                metrics = gr.Markdown(elem_id=f"rec-metrics-{suffix}")
                columns.append((recon, diff, metrics))
    outputs = [original] + [c for column in columns for c in column]

    @guarded(message, outputs)
    def run(upload_value, photo_value, first_label, second_label, size_label, resize_value):
        pixels = evaluation_input(image_bytes(upload_value, photo_value), SIZES[size_label])
        result = {message: "", original: pixels}
        chosen = [first_label, None if second_label in (None, NONE) else second_label]
        for label, (recon, diff, metrics) in zip(chosen, columns, strict=True):
            if label is None:
                result.update({recon: None, diff: None, metrics: ""})
                continue
            model = tokenizer(label)
            out = reconstruct_pixels(model, pixels, resize_value)
            result.update(
                {
                    recon: out.reconstruction,
                    diff: out.difference,
                    metrics: f"**{label}**\n\n" + out.metrics_markdown(model.notes),
                }
            )
        return result

    # raw inputs: the upload's bytes are decoded by us, so a broken file is a message, not Gradio's error
    button.click(run, [upload, photo, first, second, size, resize], [message, *outputs], preprocess=False)


def _sampling_controls(gr, prefix: str):
    with gr.Row():
        seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}-seed")
        steps = gr.Number(20, precision=0, minimum=1, label="Steps", elem_id=f"{prefix}-steps")
        cfg = gr.Number(4.5, label="CFG scale", elem_id=f"{prefix}-cfg")
    with gr.Row():
        count = gr.Number(1, precision=0, minimum=1, maximum=gen.MAX_IMAGES, label="Images", elem_id=f"{prefix}-count")
        size = gr.Number(448, precision=0, minimum=28, label="Size (px)", elem_id=f"{prefix}-size")
        scheduler = gr.Radio(["dpm", "euler"], value="dpm", label="Sampler", elem_id=f"{prefix}-scheduler")
    return [seed, steps, cfg, count, size, scheduler]


def _sampling_tab(gr, sources: Sources, photos: list[str], options: Options, cache: ModelCache, edit: bool) -> None:
    prefix = "edit" if edit else "gen"
    labels = list(sources.generator)
    with gr.Row():
        with gr.Column():
            generator = gr.Dropdown(
                labels, value=_dropdown_value(labels), label="Generator", elem_id=f"{prefix}-generator"
            )
            upload = photo = None
            if edit:
                upload, photo = _image_inputs(gr, prefix, photos)
            prompt = gr.Textbox(label="Instruction" if edit else "Prompt", lines=2, elem_id=f"{prefix}-prompt")
            controls = _sampling_controls(gr, prefix)
            button = gr.Button("Edit" if edit else "Generate", variant="primary", elem_id=f"{prefix}-run")
        with gr.Column():
            message = gr.Markdown(elem_id=f"{prefix}-message")
            source_view = gr.Image(
                label="Source", format="png", interactive=False, visible=edit, elem_id=f"{prefix}-source"
            )
            gallery = gr.Gallery(label="Result", format="png", columns=2, elem_id=f"{prefix}-gallery")
            command = gr.Textbox(
                label="The same with the generate CLI", lines=2, interactive=False, buttons=["copy"],
                elem_id=f"{prefix}-command",
            )  # fmt: skip
            files = gr.File(
                label="Download (PNG with settings, settings.json)", file_count="multiple", elem_id=f"{prefix}-files"
            )
    outputs = [source_view, gallery, command, files]

    @guarded(message, outputs)
    def run(label, upload_value, photo_value, text, seed, steps, cfg, count, size, scheduler):
        if label not in sources.generator:
            raise ValueError("choose a generator (start the demo with a generation run or a saved generator)")
        directory = gen.generator_dir(sources.generator[label])
        folder = Path(tempfile.mkdtemp(dir=options.downloads))
        source = None
        if edit:  # the CLI reads the source from a file: the upload's bytes, or the bundled photo as a PNG
            source = folder / "source.png"
            source.write_bytes(image_bytes(upload_value, photo_value))
            source_pixels = _decoded(source)
        request = gen.Request(text or "", int(seed or 0), int(steps or 0), float(cfg or 0), int(count or 0),
                              int(size or 0), scheduler, str(source) if source else None)  # fmt: skip
        argv = gen.command(directory, request, options.device, options.dtype)
        pipe = cache.get(
            ("generator", str(directory), options.device, options.dtype), directory, lambda: gen.load(argv)
        )
        images = gen.run(pipe, argv)
        paths = gen.write_downloads(images, request, argv, folder)
        shown = gen.command_line(argv)
        result = {message: "", gallery: [str(p) for p in paths[:-1]], command: shown, files: [str(p) for p in paths]}
        if edit:
            result[source_view] = source_pixels
        return result

    inputs = [generator, upload or gr.State(None), photo or gr.State(None), prompt, *controls]
    button.click(run, inputs, [message, *outputs], preprocess=False)


def _decoded(path: Path):
    """A source image as the CLI opens it, (H, W, 3) uint8; undecodable -> ValueError with the fix."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"the image could not be read ({error}); upload a JPEG, PNG or WebP image") from None


def _understand_tab(gr, sources: Sources, photos: list[str], options: Options, cache: ModelCache) -> None:
    from unilip.demo.understand import answer, load_internvl

    labels = list(sources.internvl)
    if not labels:
        gr.Markdown(
            "No InternVL checkpoint given. Export a tokenizer into InternVL "
            "(`python -m unilip.export --tokenizer <run>/tokenizer --base OpenGVLab/InternVL3-1B-hf --out <dir>`) "
            "and start the demo with `<dir>` too."
        )
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(labels, value=_dropdown_value(labels), label="InternVL checkpoint", elem_id="und-model")
            upload, photo = _image_inputs(gr, "und", photos)
            question = gr.Textbox("Describe the image.", label="Question", elem_id="und-question")
            tokens = gr.Number(32, precision=0, minimum=1, maximum=1024, label="Max new tokens", elem_id="und-tokens")
            button = gr.Button("Ask", variant="primary", elem_id="und-run")
        with gr.Column():
            message = gr.Markdown(elem_id="und-message")
            shown = gr.Image(label="Image", format="png", interactive=False, elem_id="und-image")
            reply = gr.Textbox(label="Answer", interactive=False, elem_id="und-answer")

    @guarded(message, [shown, reply])
    def run(label, upload_value, photo_value, text, max_tokens):
        if label not in sources.internvl:
            raise ValueError("choose an InternVL checkpoint")
        path = sources.internvl[label]
        data = image_bytes(upload_value, photo_value)
        image = _open_rgb(data)
        internvl = cache.get(
            ("internvl", str(path), options.device), path, lambda: load_internvl(path, options.device, options.dtype)
        )
        return {message: "", shown: image, reply: answer(internvl, image, text or "", int(max_tokens or 0))}

    button.click(run, [model, upload, photo, question, tokens], [message, shown, reply], preprocess=False)


def _open_rgb(data: bytes):
    """Image bytes -> RGB as a viewer shows it (`unilip.data.transforms.as_rgb`); undecodable -> ValueError."""
    from PIL import Image, UnidentifiedImageError

    from unilip.data.transforms import as_rgb

    try:
        return as_rgb(Image.open(io.BytesIO(data)))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"the image could not be read ({error}); upload a JPEG, PNG or WebP image") from None
