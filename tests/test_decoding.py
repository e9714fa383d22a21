"""Every common image mode decodes to the pixels a viewer shows: compared value by value with arrays
built by hand, through `decode_image`, the shard maker and the loader."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from unilip.data import ShardDataModule, write_shards
from unilip.data.make_shards import folder_records, main
from unilip.data.transforms import as_rgb, decode_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def decoded(data: bytes, min_side: int = 4096) -> np.ndarray:  # large: no JPEG draft downscaling
    return np.asarray(decode_image(data, min_side))


def gradient16() -> np.ndarray:
    """(8, 64) uint16 ramp over the whole 16-bit range: 0, 1040, ..., 65535."""
    return np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = gradient16()
    data = encoded(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # PIL's 16-bit grayscale mode
    rgb = decoded(data)
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 -> 255, 32768 -> 128, 0 -> 0
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert abs(rgb.mean() - 127.5) < 1  # a plain convert("RGB") gives a mean near 251 (almost all white)


def test_32_bit_integer_grayscale_holding_16_bit_values_is_scaled_too():
    ramp = gradient16().astype(np.int32)
    rgb = np.asarray(as_rgb(Image.fromarray(ramp, "I")))
    np.testing.assert_array_equal(rgb[..., 1], np.rint(ramp / 257.0).astype(np.uint8))


def png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """The payload of the first chunk of type `kind` in PNG bytes, None if there is none."""
    at = 8  # after the signature
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        if data[at + 4 : at + 8] == kind:
            return data[at + 8 : at + 8 + length]
        at += 12 + length  # length, type, payload, CRC
    return None


@pytest.mark.parametrize("transparent", [0, 32896])  # black (the common case), and mid-gray in 16-bit units
def test_16_bit_grayscale_png_with_a_transparent_level_shows_white_there(transparent):
    levels = np.array([[transparent, 0, 1, 32896], [32897, 257, 65535, transparent]], np.uint16)
    data = encoded(Image.fromarray(levels), "PNG", transparency=transparent)
    assert png_chunk(data, b"IHDR")[8:10] == bytes([16, 0])  # bit depth 16, colour type 0: 16-bit grayscale
    assert png_chunk(data, b"tRNS") == transparent.to_bytes(2, "big")  # the one fully transparent level
    # Only the exact 16-bit level is transparent: 1 and 32897 are opaque (8-bit 0 and 128, like 0 and 32896).
    opaque = {0: 0, 1: 0, 32896: 128, 32897: 128, 257: 1, 65535: 255}
    expected = np.array([[255 if v == transparent else opaque[v] for v in row] for row in levels.tolist()])
    rgb = decoded(data)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_palette_with_a_transparent_index_shows_white_where_transparent():
    image = Image.new("P", (4, 4))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    indices = np.zeros((4, 4), np.uint8)
    indices[:2] = 1  # the top half is index 1, declared transparent below
    image.putdata(indices.flatten().tolist())
    rgb = decoded(encoded(image, "PNG", transparency=1))
    np.testing.assert_array_equal(rgb[:2], np.full((2, 4, 3), 255))  # transparent -> white, not blue
    np.testing.assert_array_equal(rgb[2:], np.tile([255, 0, 0], (2, 4, 1)))


def test_rgba_and_la_are_composited_over_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red
    rgba[0, 1] = [0, 0, 255, 0]  # fully transparent blue
    rgba[0, 2] = [0, 0, 0, 51]  # black at 20 %: 255 * (1 - 51/255) = 204
    rgb = decoded(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 2], [204, 204, 204])

    la = np.array([[[100, 255], [100, 0]]], np.uint8)  # gray 100 opaque, gray 100 transparent
    rgb = decoded(encoded(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(rgb[0], [[100, 100, 100], [255, 255, 255]])


def test_grayscale_becomes_three_equal_channels():
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1))
    rgb = decoded(encoded(Image.fromarray(ramp, "L"), "PNG"))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], ramp)


CMYK = np.array([30, 180, 90, 60], np.uint8)  # C, M, Y, K as PIL reads them (0 = no ink)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """The naive conversion PIL documents: R = 255 * (1 - C/255) * (1 - K/255), likewise G from M, B from Y."""
    c, m, y, k = (cmyk.astype(np.float64) / 255).T
    return np.rint(255 * np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1))


def test_cmyk_jpeg_decodes_to_its_colour():
    data = encoded(Image.fromarray(np.tile(CMYK, (16, 16, 1)), "CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = decoded(data)
    np.testing.assert_allclose(rgb[8, 8], cmyk_to_rgb(CMYK), atol=3)  # (172, 57, 126) within JPEG error


def ycck_jpeg(cmyk: np.ndarray, size: int = 16) -> bytes:
    """An Adobe YCCK JPEG of one CMYK colour, as Photoshop writes them.

    YCCK stores (C, M, Y) through the JPEG RGB -> YCbCr transform and K as is, and the Adobe APP14
    marker says so (transform 2); libjpeg converts back on decode. PIL cannot write YCCK, so the
    components are computed here, written as CMYK (PIL stores Adobe's inverted values, 255 - v), and
    the marker's transform byte is set to 2.
    """
    c, m, y, k = cmyk.astype(np.float64)
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = 128 - 0.168736 * c - 0.331264 * m + 0.5 * y
    cr = 128 + 0.5 * c - 0.418688 * m - 0.081312 * y
    stored = np.array([luma, cb, cr, 255 - k])
    given = np.clip(np.rint(255 - stored), 0, 255).astype(np.uint8)  # PIL writes 255 - v
    data = bytearray(encoded(Image.fromarray(np.tile(given, (size, size, 1)), "CMYK"), "JPEG", quality=100))
    marker = data.index(b"\xff\xee")  # APP14: length (2), "Adobe", version (2), flags (4), transform
    assert data[marker + 4 : marker + 9] == b"Adobe" and data[marker + 15] == 0
    data[marker + 15] = 2  # Adobe transform: YCCK
    return bytes(data)


def test_ycck_jpeg_decodes_to_its_colour():
    data = ycck_jpeg(CMYK)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK" and opened.info.get("adobe_transform") == 2
    np.testing.assert_allclose(decoded(data)[8, 8], cmyk_to_rgb(CMYK), atol=3)


def quadrants(height: int, width: int) -> np.ndarray:
    """Top-left red, top-right green, bottom-left blue, bottom-right white."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = [255, 0, 0]
    image[:h, w:] = [0, 255, 0]
    image[h:, :w] = [0, 0, 255]
    image[h:, w:] = [255, 255, 255]
    return image


def quadrant_colours(rgb: np.ndarray) -> list[list[int]]:
    """Mean colour of each quadrant (TL, TR, BL, BR), away from the edges JPEG blurs."""
    h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
    centres = [(h // 2, w // 2), (h // 2, w + w // 2), (h + h // 2, w // 2), (h + h // 2, w + w // 2)]
    return [np.rint(rgb[y - 2 : y + 2, x - 2 : x + 2].reshape(-1, 3).mean(0)).tolist() for y, x in centres]


RED, GREEN, BLUE, WHITE = [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]


@pytest.mark.parametrize(
    ("orientation", "shape", "expected"),
    [
        (1, (32, 64), [RED, GREEN, BLUE, WHITE]),  # stored as shown
        (3, (32, 64), [WHITE, BLUE, GREEN, RED]),  # stored upside down
        (6, (64, 32), [BLUE, RED, WHITE, GREEN]),  # stored turned 90 deg counter-clockwise: shown turned back
        (8, (64, 32), [GREEN, WHITE, RED, BLUE]),  # stored turned 90 deg clockwise
    ],
)
def test_exif_orientation_is_applied(orientation, shape, expected):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    data = encoded(Image.fromarray(quadrants(32, 64)), "JPEG", quality=95, exif=exif.tobytes())
    rgb = decoded(data)
    assert rgb.shape[:2] == shape
    np.testing.assert_allclose(quadrant_colours(rgb), expected, atol=12)


def test_unreadable_bytes_say_so_without_a_buffer_address():
    with pytest.raises(ValueError, match=r"^not an image PIL can read") as error:
        decode_image(b"definitely not an image", 8)
    assert "BytesIO" not in str(error.value)


def test_16_bit_png_through_the_shard_maker_and_the_loader(tmp_path):
    """The reported failure: a 16-bit PNG passed make_shards and came out of the loader all 255."""
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    (tmp_path / "in").mkdir()
    Image.fromarray(ramp).save(tmp_path / "in" / "depth.png")
    report = write_shards(folder_records(tmp_path / "in"), tmp_path / "out", prefix="p")
    assert report.written == 1 and not report.bad
    data = ShardDataModule(val_urls=str(tmp_path / "out" / "p-*.tar"), image_size=32, num_workers=0)
    (batch,) = list(data.val_dataloader())
    image = batch["image"][0]  # (3, 32, 32) uint8, the native size: no resampling
    expected = np.rint(ramp / 257.0)
    np.testing.assert_array_equal(image[0].numpy(), expected)
    assert abs(image.double().mean().item() - 127.5) < 2.5  # not 255 (white)


def test_the_shard_maker_downscales_large_images_by_default_and_counts_ignored_files(tmp_path, caplog):
    root = tmp_path / "in"
    root.mkdir()
    big = np.zeros((1200, 2000, 3), np.uint8)
    big[:, 1000:] = 255  # left black, right white
    Image.fromarray(big).save(root / "big.png")
    Image.fromarray(big[:300, :400]).save(root / "small.png")
    (root / "notes.txt").write_text("not a caption: no notes.<image> next to it")
    (root / "meta.json").write_text("{}")
    with caplog.at_level("INFO"):
        assert main([str(root), str(tmp_path / "out")]) == 0
    assert "ignored 2 files that are not images (1 .json, 1 .txt)" in caplog.text
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members["small.png"] == (root / "small.png").read_bytes()  # small: kept byte for byte
    resized = np.asarray(Image.open(io.BytesIO(members["big.png"])))
    assert resized.shape == (1024, 1707, 3)  # shorter side 1200 -> 1024 (default --max-size), aspect kept
    assert resized[:, :800].max() == 0 and resized[:, 900:].min() == 255


def test_the_shard_maker_names_the_bad_file(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "fake.jpg").write_bytes(b"text, not a JPEG")
    Image.new("RGB", (8, 8)).save(root / "good.png")
    report = write_shards(folder_records(root), tmp_path / "out")
    assert report.written == 1
    (bad,) = report.bad
    assert bad.startswith(str(root / "fake.jpg")) and "not an image PIL can read" in bad and "BytesIO" not in bad


def test_the_shard_maker_refuses_to_mix_with_existing_shards(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    write_shards(folder_records(root), tmp_path / "out")
    before = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    with pytest.raises(ValueError, match="already holds 1 shard-"):
        write_shards(folder_records(root), tmp_path / "out")
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == before
