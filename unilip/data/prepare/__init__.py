"""Turn each of the recipe's datasets, downloaded as published, into shards the loader reads: one command each.

    python -m unilip.data.prepare <dataset> <download folder> <out folder> [--workers N]

Datasets (`unilip.data.prepare.datasets.DATASETS`; docs/data.md: where to download, disk, time):

- `blip3o-pretrain`, `journeydb`, `blip3o-60k`: published as webdataset shards (`jpg` + `txt`). Every
  shard is verified (each image decodes) and indexed in place: the out folder gets links to the good
  shards and their sample counts (`in_place`), never a copy.
- `gpt-image-edit`: image folders + annotation JSONs listed in `gptedit.txt` -> edit shards, single-turn
  edits only, the authors' instruction cleaning (`gpt_image_edit`).
- `sharegpt4o-t2i`, `sharegpt4o-edit`: `text_to_image.json` / `text_and_image_to_image.json` + image
  archives -> text-to-image / edit shards (`sharegpt4o`).
- `imagenet`: the validation set (Hugging Face, image-net.org or class folders) -> `val-*.tar` (`imagenet`).

Every run verifies every image (a bad one is skipped and named, never fatal), writes shards of
`--samples-per-shard` samples with `--workers` processes (`writer`), each under a temporary name renamed
when complete, and keeps its books in the out folder (`runner`): killed and started again with the same
arguments, it redoes only the unfinished shards, and ends with the same files as an uninterrupted run.
The out folder ends with `index.json` (sample counts, which the data presets' `repeat` needs) and
`<prefix>-report.json` (what was written, skipped and left out by the authors' selection, item by item).
The out folders named in docs/data.md are the paths the data presets read (conf/data/blip3o.yaml,
blip3o_generation.yaml, imagenet_val.yaml).

This package reads files and writes shards; it knows nothing of models or training.
"""
