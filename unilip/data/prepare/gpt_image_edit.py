"""GPT-Image-Edit-1.5M (UCSC-VLAA) -> edit shards (`source.<ext>`, `target.<ext>`, `instruction.txt`).

The layout is the one the authors' converter reads (nnnth/UniLIP `data/convert_gpt_edit.py`), which is
the layout GPT-Image-Edit's own training reads (wyhlovecpp/GPT-Image-Edit, README "Data preparation"):

    <download>/gptedit.txt           one line per part: `<image folder>,<annotation JSON>,<flag>`
                                     (GPT-Image-Edit's README calls it data.txt; either name is read)
    <download>/<annotation JSON>     a list of records {"image": [input, output], "conversations":
                                     [{"from": "human", "value": "<image>\\n<instruction>"}, ...], ...}
    <download>/<image folder>/<path> the images, `image` paths relative to their part's image folder

Both paths of a line are relative to the download folder (an absolute path stays as it is). The
authors' selection: only records with exactly two images (input, output), i.e. single-turn edits; the
instruction is `conversations[0].value` with every `<image>` tag and every line break removed. The
records keep their order (parts in the list's order, records in each JSON's order) and are numbered
`00000000`, `00000001`, ... over the selected ones, as the authors' converter numbers them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unilip.data.prepare.writer import Conversion, Record, load_json_list
from unilip.errors import ConfigError, UnreadableFileError

LIST_FILES = ("gptedit.txt", "data.txt")


def clean_instruction(value: str) -> str:
    """The authors' cleaning of `conversations[0].value`: the image tags and line breaks go."""
    return value.replace("<image>", "").replace("\n", "")


def plan(download: Path) -> Conversion:
    parts = _parts(download)
    total, not_selected = 0, []
    for _, annotation in parts:
        for index, item in enumerate(load_json_list(annotation)):
            reason = _not_selected(item)
            if reason:
                not_selected.append((f"{annotation.name}[{index}]", reason))
            else:
                total += 1
    return Conversion(lambda: _records(parts), total, not_selected)


def _records(parts: list[tuple[Path, Path]]) -> Iterator[Record]:
    number = 0
    for images, annotation in parts:
        for item in load_json_list(annotation):
            if _not_selected(item):
                continue
            source, target = item["image"]
            instruction = clean_instruction(item["conversations"][0]["value"])
            yield Record(
                f"{number:08d}",
                {"source.": images / source, "target.": images / target},
                {"instruction.txt": instruction},
            )
            number += 1


def _not_selected(item: Any) -> str:
    """Why the authors' selection leaves this record out, or "" if it keeps it."""
    if not isinstance(item, dict):
        return f"not a record ({type(item).__name__})"
    images = item.get("image")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or len(images) != 2 or not all(isinstance(p, str) for p in images):
        count = len(images) if isinstance(images, list) else 0
        return f"not a single-turn edit ({count} image(s); an edit has 2)"
    try:
        value = item["conversations"][0]["value"]
    except (KeyError, IndexError, TypeError):
        return "no instruction (conversations[0].value)"
    return "" if isinstance(value, str) else "no instruction (conversations[0].value)"


def _parts(download: Path) -> list[tuple[Path, Path]]:
    """(image folder, annotation JSON) of each line of the download's list file."""
    found = [download / name for name in LIST_FILES if (download / name).is_file()]
    if not found:
        raise ConfigError(
            f"{download} holds no gptedit.txt (or data.txt); is it the GPT-Image-Edit-1.5M download? Write the "
            "list as GPT-Image-Edit's README shows, one line per part: <image folder>,<annotation JSON>,false "
            "(e.g. gpt-edit/hqedit/edit,training_json/hqedit_gpt_edit.json,false)"
        )
    listing = found[0]
    parts = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise UnreadableFileError(
                f"{listing}, line {number}: expected <image folder>,<annotation JSON>,<flag>, got {line.strip()!r}"
            )
        images, annotation = download / fields[0], download / fields[1]
        if not annotation.is_file():
            raise FileNotFoundError(f"{listing}, line {number}: the annotation file {annotation} does not exist")
        if not images.is_dir():
            raise FileNotFoundError(
                f"{listing}, line {number}: the image folder {images} does not exist (extract the part's archives)"
            )
        parts.append((images, annotation))
    if not parts:
        raise ConfigError(f"{listing} lists no parts; one line per part: <image folder>,<annotation JSON>,false")
    return parts
