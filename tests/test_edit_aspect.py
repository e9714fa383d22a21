"""Edits at the source's aspect ratio (ImgEdit, GEdit-Bench): the latent grid keeps the source's shape within
one cell and the model's token budget; a square source gives exactly the square images."""

import json
import math

import pytest
from PIL import Image

from tests import sampling_helpers as data
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.benchmarks.__main__ import main
from unilip.pipelines.sampling import aspect_grid

SIZE = 84  # a 3 x 3 latent grid: 9 tokens, 28 px per cell
FAST = [f"sampler.size={SIZE}", "sampler.steps=2", "batch_size=4"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return data.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


@pytest.mark.parametrize(
    "width, height, grid",
    [
        (1, 1, (16, 16)),  # square: the 448 px grid itself
        (4, 3, (14, 18)),  # sqrt(256 / (4/3)) = 13.9: 14 rows x round-down(18.7) = 252 tokens; 14 x 19 = 266 > 256
        (3, 4, (18, 14)),
        (16, 9, (12, 21)),  # sqrt(144) = 12 rows; 21.3 -> 21 (22 would be 264 tokens)
        (2, 1, (11, 22)),  # 11.3 -> 11 x 22 = 242; 12 x 24 = 288 > 256
    ],
)
def test_the_latent_grid_keeps_the_aspect_ratio_within_the_token_budget(width, height, grid):
    assert aspect_grid(16, width, height) == grid


def test_every_aspect_ratio_stays_within_one_cell_and_the_budget():
    for step in range(-200, 201):  # ratios 1/4 ... 4
        width = round(1000 * 4 ** (step / 200))
        rows, columns = aspect_grid(16, width, 1000)
        short, long, stretch = min(rows, columns), max(rows, columns), max(width, 1000) / min(width, 1000)
        assert not (columns > rows and width < 1000) and not (rows > columns and width > 1000)  # never turned
        assert rows * columns <= 256 and abs(long - short * stretch) < 1
        # no grid in the budget within one cell of the shape is larger (checked against every grid)
        best = max(s * n for s in range(1, 17) for n in range(s, 257) if s * n <= 256 and abs(n - s * stretch) < 1)
        assert rows * columns == best


def _sources(root, sizes):
    """ImgEdit's basic_edit.json with one real photo per (width, height)."""
    from skimage import data as skdata

    edits = {}
    for index, (width, height) in enumerate(sizes):
        name = f"photos/{index}.jpg"
        (root / "photos").mkdir(parents=True, exist_ok=True)
        Image.fromarray(skdata.astronaut()).resize((width, height)).save(root / name)
        edits[str(index)] = {"id": name, "prompt": f"Edit number {index}", "edit_type": "alter"}
    (root / "edits.json").write_text(json.dumps(edits))
    return root / "edits.json"


def test_edits_have_their_sources_aspect_ratio(generator_dir, tmp_path):
    sizes = [(120, 80), (80, 120), (100, 100), (96, 40)]
    edits = _sources(tmp_path, sizes)
    main(["imgedit", f"generator={generator_dir}", f"out={tmp_path / 'out'}", f"prompts={edits}", *FAST])
    outputs = [Image.open(tmp_path / "out" / "images" / f"{i}.png").size for i in range(len(sizes))]
    # at most 3 x 3 cells of 28 px: 3:2 -> 2 x 3 cells (84 x 56), 2:3 -> 3 x 2, 1:1 -> 3 x 3, 12:5 -> 2 rows x
    # 4 columns (2 x 2.4 = 4.8; 5 columns would be 10 tokens)
    assert outputs == [(84, 56), (56, 84), (84, 84), (112, 56)]
    for (width, height), (out_width, out_height) in zip(sizes, outputs, strict=True):
        assert abs(out_width - out_height * width / height) < 28 or abs(out_height - out_width * height / width) < 28
        assert math.ceil(out_width / 28) * math.ceil(out_height / 28) <= 9


def test_square_sources_give_exactly_the_square_images(generator_dir, tmp_path):
    edits = _sources(tmp_path, [(100, 100), (60, 60), (80, 80)])
    runs = {}
    for aspect in ("source", "square"):
        out = tmp_path / aspect
        main(["imgedit", f"generator={generator_dir}", f"out={out}", f"prompts={edits}", f"benchmark.aspect={aspect}",
              *FAST])  # fmt: skip
        runs[aspect] = [(out / "images" / f"{i}.png").read_bytes() for i in range(3)]
    assert runs["source"] == runs["square"]
    with pytest.raises(SystemExit, match=r"^error: .* holds images made with other settings \(inputs"):
        main(["imgedit", f"generator={generator_dir}", f"out={tmp_path / 'square'}", f"prompts={edits}", *FAST])
