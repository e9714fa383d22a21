"""Raw webdataset sample -> cropped RGB arrays + caption, and a list of those -> a uint8 batch.

Sample formats (extensions are matched lower-case):

- image-caption: one image member `jpg`, `jpeg`, `png` or `webp`, plus an optional caption:
  `txt` (UTF-8), or `json` with the first non-empty field of `caption`, `text`, `prompt`.
- editing: `source.<e>` and `target.<e>` with <e> one of the image extensions above, plus
  `instruction.txt` (or a `json` with an `instruction` field). The target is the image to
  generate, the instruction its caption, the source the condition. The UniLIP authors' converted
  edit shards (`data/convert_gpt_edit.py`, `convert_janus4o_ti2i.py`: `input.jpg`, `output.jpg`, `txt`)
  are read as they are: input is the source, output the target, `txt` the instruction.
- cached generation targets: `latents.safetensors` and `txt` (`unilip.data.latent_cache`); they give
  examples and batches of latents instead of images.

Two ways to size images (`resize`):

- "shorter_edge" (the tokenizer recipe): resize the shorter edge to the crop size, random crop
  (centre crop for evaluation), random horizontal flip. Source and target of an edit get the same
  crop, expressed as fractions of the image so it also fits when their sizes differ.
- "square" (generation, as the reference's InternVL processing): the whole image resized to S x S,
  no crop and no flip: a flip contradicts "left"/"right" in a caption and a crop can cut away an
  object it names.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import default_collate

from unilip.data import latent_cache

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text", "prompt")
RESIZE_MODES = ("shorter_edge", "square")


# Transparent pixels are composited over white, as a viewer shows them on a page; a plain RGB conversion
# would keep whatever colour the transparent pixels happen to store.
BACKGROUND = (255, 255, 255)
_HIGH_DEPTH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG / TIFF grayscale (and 32-bit int)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def decode_image(data: bytes, min_side: int) -> Image.Image:
    """Decode image bytes to 8-bit RGB as a viewer shows the image (see `as_rgb`), at no less than
    `min_side` pixels on the shorter edge if it had them.

    JPEGs are decoded with PIL's `draft`, which lets libjpeg downscale by 2, 4 or 8 in the DCT:
    much faster than a full decode followed by a resize, and the result still has at least the
    size the crop needs.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (unknown format or corrupt header)") from None
    if image.format == "JPEG":
        width, height = image.size
        scale = min_side / min(width, height)
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return as_rgb(image)


def as_rgb(image: Image.Image) -> Image.Image:
    """An opened image -> 8-bit RGB, upright, as a viewer shows it.

    - the EXIF orientation is applied (a phone photo stored sideways comes out upright);
    - 16-bit grayscale (PIL modes I;16*, and I as 16-bit PNGs may open) is scaled to 8 bits
      (value / 257); PIL's own conversion clips it, which turns most of the image white; its transparent
      level (a PNG's tRNS) becomes white;
    - transparency (RGBA, LA, PA, a palette or RGB with a transparent colour) is composited over white;
    - grayscale, palette, CMYK and YCCK JPEGs (libjpeg undoes YCCK, PIL Adobe's inverted CMYK) convert as PIL does.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_GRAY:
        levels = np.asarray(image)
        gray = np.clip(np.rint(levels.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a grayscale PNG's tRNS: the one 16-bit level that is fully transparent
            rgb[levels == transparent] = BACKGROUND
        return Image.fromarray(rgb)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[float, float, float, float]:
    """The square that the shorter-edge resize + crop keeps, as fractions (x0, y0, x1, y1) of the image.

    `rng=None` gives the centre crop; otherwise the offset is uniform over the resized image.
    """
    scale = size / min(width, height)
    resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
    if rng is None:
        x, y = (resized_w - size) // 2, (resized_h - size) // 2
    else:
        x, y = rng.randint(0, resized_w - size), rng.randint(0, resized_h - size)
    return x / resized_w, y / resized_h, (x + size) / resized_w, (y + size) / resized_h


def render(image: Image.Image, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """Resample the fractional `box` of `image` to (size, size, 3) uint8, mirrored if `flip`.

    Resizing only the box (PIL's `box=`) is the same as resize-then-crop, without resizing
    pixels that are thrown away. Bicubic with antialiasing; `reducing_gap` first shrinks large
    images by an integer factor, which PIL documents as indistinguishable from exact at >= 3.
    """
    width, height = image.size
    pixels = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=pixels, reducing_gap=3.0)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out)  # a writable copy (np.asarray of a PIL image is read-only, which torch warns about)


def _find(raw: dict, prefix: str) -> bytes | None:
    for ext in IMAGE_EXTS:
        if (data := raw.get(prefix + ext)) is not None:
            return data
    return None


# Edit members: ours (`unilip-make-shards`, `prepare`) first, then the UniLIP authors' converted shards'.
SOURCE_PREFIXES = ("source.", "input.")
TARGET_PREFIXES = ("target.", "output.")
INSTRUCTION_KEYS = ("instruction.txt", "txt")


def _find_any(raw: dict, prefixes: tuple[str, ...]) -> bytes | None:
    for prefix in prefixes:
        if (data := _find(raw, prefix)) is not None:
            return data
    return None


def _text(raw: dict, txt_keys: str | tuple[str, ...], fields: tuple[str, ...]) -> str:
    for txt_key in (txt_keys,) if isinstance(txt_keys, str) else txt_keys:
        if (data := raw.get(txt_key)) is not None:
            return data.decode("utf-8").strip()
    if (data := raw.get("json")) is not None:
        meta = json.loads(data)
        for name in fields:
            if isinstance(meta.get(name), str) and meta[name].strip():
                return meta[name].strip()
    return ""


@dataclass
class SampleTransform:
    """Turn one raw sample into an example: `image` (S, S, 3) uint8, `caption`, `key`, maybe `source`.

    Args:
        image_size: side S of the square crop (224, 448, any positive size).
        train: random crop and flip if True; centre crop, no flip, if False.
        random_flip: flip horizontally with probability 0.5 during training.
        flip_edits: also flip edit pairs. Off by default because edit instructions may name
            left and right ("remove the cup on the left"), which a mirror image would contradict.
        with_source: keep the source image of edit samples (generation/editing training);
            if False an edit sample is used as an image-caption sample (target + instruction).
        resize: "shorter_edge" (crop, flip as above) or "square" (whole image to S x S: never a
            crop or a flip, whatever `random_flip` says).
    """

    image_size: int
    train: bool
    random_flip: bool = True
    flip_edits: bool = False
    with_source: bool = False
    resize: str = "shorter_edge"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={self.resize!r}; use one of {RESIZE_MODES}")

    def __call__(self, raw: dict, rng: random.Random | None) -> dict:
        """Raise on any undecodable or incomplete sample; the caller counts and skips it."""
        if latent_cache.MEMBER in raw:
            return latent_cache.cached_example(raw)
        size = self.image_size
        target = _find_any(raw, TARGET_PREFIXES)
        is_edit = target is not None
        data = target if is_edit else _find(raw, "")
        if data is None:
            raise ValueError(
                f"no image member (expected one of {IMAGE_EXTS}, target.<ext> or output.<ext>); has {sorted(raw)}"
            )
        image = decode_image(data, size)
        square = self.resize == "square"
        box = (0.0, 0.0, 1.0, 1.0) if square else crop_box(*image.size, size, rng if self.train else None)
        may_flip = self.train and self.random_flip and (self.flip_edits or not is_edit) and not square
        flip = may_flip and rng is not None and rng.random() < 0.5
        example = {"image": render(image, box, size, flip), "key": raw["__key__"]}
        if is_edit:
            example["caption"] = _text(raw, INSTRUCTION_KEYS, ("instruction",))
        else:
            example["caption"] = _text(raw, "txt", CAPTION_FIELDS)
        if self.with_source:
            source = _find_any(raw, SOURCE_PREFIXES) if is_edit else None
            if is_edit and source is None:
                raise ValueError("edit sample without a source.<ext> (or input.<ext>) image")
            example["source"] = None if source is None else render(decode_image(source, size), box, size, flip)
        return example


def collate(examples: list[dict], with_source: bool) -> dict:
    """Stack examples into the batch contract.

    Returns:
        `image` (B, 3, S, S) uint8; `caption` list[str]; `key` list[str]; with `with_source` also
        `source_image` (B, 3, S, S) uint8 (zeros for text-to-image samples) and `has_source` (B,) bool.
        The training and evaluation modules turn images into floats on their device (`batch_to_float`).
        Cached latents give `unilip.data.latent_cache.collate_cached`'s batch instead.
    """
    cached = ["latent" in e for e in examples]
    if any(cached):
        if not all(cached):
            raise ValueError("a batch mixes cached latents and images; cache every source of the stage or none")
        return latent_cache.collate_cached(examples)
    batch = {
        "image": _stack([e["image"] for e in examples]),
        "caption": [e["caption"] for e in examples],
        "key": [e["key"] for e in examples],
    }
    if with_source:
        blank = np.zeros_like(examples[0]["image"])
        sources = [blank if e["source"] is None else e["source"] for e in examples]
        batch["source_image"] = _stack(sources)
        batch["has_source"] = torch.tensor([e["source"] is not None for e in examples], dtype=torch.bool)
    return batch


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """B arrays (S, S, 3) uint8 -> (B, 3, S, S) uint8, contiguous.

    uint8, not float: a quarter of the bytes to fill, share between processes, pin and copy to the GPU
    (at 448 px a float32 batch of 32 is 77 MB of fresh memory, whose first-touch page faults capped the
    loader). `default_collate` stacks straight into shared memory in a DataLoader worker, so the batch
    reaches the main process without a second copy.
    """
    return default_collate([torch.from_numpy(image).permute(2, 0, 1) for image in images])


# Every 8-bit level as the float loader computed it on the host (v / 255 in float32). Looked up, they are
# the same bits on any device: a GPU divides by a scalar as a multiply by its reciprocal, which differs in
# the last bit for about half of the levels.
_LEVELS = torch.arange(256, dtype=torch.float32) / 255.0
_LEVELS_ON: dict[torch.device, torch.Tensor] = {}
IMAGE_KEYS = ("image", "source_image")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 in [0, 1] on the images' device (v / 255, bit for bit what the host
    computes); a floating-point tensor is returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    if images.device.type == "cpu":
        return images.float().div_(255.0)  # the host's own division (twice as fast as the lookup there)
    return lookup_levels(images)


def lookup_levels(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 by looking up `_LEVELS` on the images' device (one gather, no arithmetic)."""
    levels = _LEVELS_ON.get(images.device)
    if levels is None:
        levels = _LEVELS_ON[images.device] = _LEVELS.to(images.device)
    return levels.index_select(0, images.reshape(-1).int()).view(images.shape)


def batch_to_float(batch: dict) -> dict:
    """A batch with its uint8 images (`image`, `source_image`) as float32 in [0, 1], on their device."""
    return {key: to_float(value) if key in IMAGE_KEYS else value for key, value in batch.items()}
