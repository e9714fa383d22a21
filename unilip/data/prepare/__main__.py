"""`python -m unilip.data.prepare <dataset> <download folder> <out folder>`: see `unilip.data.prepare`."""

from __future__ import annotations

import argparse

from unilip.data.prepare import __doc__ as DOC
from unilip.data.prepare.datasets import DATASETS, default_workers, prepare
from unilip.data.prepare.writer import DEFAULT_MAX_SIZE
from unilip.logs import cli_logging, one_line_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unilip.data.prepare",
        description=DOC.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="datasets:\n" + "\n".join(f"  {name:16s} {d.hub}" for name, d in DATASETS.items()),
    )
    parser.add_argument("dataset", choices=list(DATASETS), metavar="dataset", help="one of the datasets below")
    parser.add_argument("download", help="the folder the dataset was downloaded to, as published")
    parser.add_argument("out", help="the folder for the shards (new or empty; the same folder resumes a run)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes (default: all CPUs)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=None, help="default: the dataset's, for shards of ~0.5-1 GB"
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        help=f"downscale images whose shorter side exceeds this many pixels (default {DEFAULT_MAX_SIZE}; 0: never)",
    )
    args = parser.parse_args(argv)
    cli_logging()
    with one_line_errors():
        prepare(args.dataset, args.download, args.out, args.workers, args.samples_per_shard, args.max_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
