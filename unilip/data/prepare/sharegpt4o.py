"""ShareGPT-4o-Image (FreedomIntelligence) -> text-to-image shards (`<ext>` + `txt`) and edit shards.

The layout is the dataset's download as the authors' converters read it (nnnth/UniLIP
`data/convert_janus4o_t2i.py`, `convert_janus4o_ti2i.py`, `untar_sharegpt.sh`) and as the dataset's own
training code does (FreedomIntelligence/ShareGPT-4o-Image `train_janus.py`: image paths are relative to
the JSON's folder):

    <download>/text_to_image.json             [{"input_prompt": text, "output_image": path}, ...]
    <download>/text_and_image_to_image.json   [{"input_prompt": text, "input_image": [path], "output_image": path}]
    <download>/*.tar                          the images, under those paths

The authors unpack the archives in place (`untar_sharegpt.sh`); here an image is read from its file
if it was unpacked, else straight out of the archive that holds it (no unpacking, no extra disk).
The authors' selection: edits with exactly one input image (their converter asserts it); prompts are
used as they are. Records keep the JSON's order and are numbered `00000000`, ... over the selected ones.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unilip.data.prepare.writer import Conversion, ImageRef, Record, TarMember, load_json_list
from unilip.errors import ConfigError, UnreadableFileError

T2I_JSON = "text_to_image.json"
EDIT_JSON = "text_and_image_to_image.json"


def plan_t2i(download: Path) -> Conversion:
    return _plan(download, T2I_JSON, edit=False)


def plan_edit(download: Path) -> Conversion:
    return _plan(download, EDIT_JSON, edit=True)


def _plan(download: Path, name: str, edit: bool) -> Conversion:
    path = download / name
    if not path.is_file():
        raise ConfigError(f"{download} holds no {name}; is it the ShareGPT-4o-Image download?")
    items = load_json_list(path)
    not_selected = [(f"{name}[{i}]", reason) for i, item in enumerate(items) if (reason := _not_selected(item, edit))]
    total = len(items) - len(not_selected)
    return Conversion(lambda: _records(download, path, edit), total, not_selected)


def _records(download: Path, path: Path, edit: bool) -> Iterator[Record]:
    images = Images(download)
    number = 0
    for item in load_json_list(path):
        if _not_selected(item, edit):
            continue
        key, prompt = f"{number:08d}", item["input_prompt"]
        target = images.find(item["output_image"])
        if edit:
            source = images.find(item["input_image"][0])
            yield Record(key, {"source.": source, "target.": target}, {"instruction.txt": prompt})
        else:
            yield Record(key, {"": target}, {"txt": prompt})
        number += 1


def _not_selected(item: Any, edit: bool) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("output_image"), str):
        return "no output_image"
    if not isinstance(item.get("input_prompt"), str):
        return "no input_prompt"
    if edit:
        inputs = item.get("input_image")
        if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
            return "no input_image list"
        if len(inputs) != 1:
            return f"{len(inputs)} input images; the authors' edits have one"
    return ""


class Images:
    """Image paths of the JSON -> the unpacked file, or the member of a `<download>/*.tar` archive."""

    def __init__(self, download: Path):
        self.download = download
        self._members: dict[str, TarMember] | None = None

    def find(self, relative: str) -> ImageRef:
        path = self.download / relative
        if path.is_file():
            return path
        if self._members is None:
            self._members = archive_members(sorted(self.download.glob("*.tar")))
        return self._members.get(_normal(relative), path)  # neither: the missing file is named when written


def archive_members(archives: list[Path]) -> dict[str, TarMember]:
    """{member name: where its bytes lie} over uncompressed tar archives (headers only are read)."""
    members = {}
    for archive in archives:
        try:
            with tarfile.open(archive, "r:") as tar:
                for info in tar:
                    if info.isfile():
                        members[_normal(info.name)] = TarMember(str(archive), info.offset_data, info.size, info.name)
        except tarfile.TarError as error:
            raise UnreadableFileError(f"{archive}: not a readable tar archive ({error}); download it again") from None
    return members


def _normal(name: str) -> str:
    return name.removeprefix("./")
