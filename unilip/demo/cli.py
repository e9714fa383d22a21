"""`python -m unilip.demo FOLDER...` (or `unilip-demo`): classify the folders, build the page, serve it.

The page is served on 127.0.0.1 (this machine only) unless `--host` says otherwise, and the first line printed
says where and to whom. A folder that does not exist, or holds nothing the demo can show, is one `error:` line.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
from pathlib import Path

from unilip.errors import ConfigError
from unilip.logs import cli_logging, one_line_errors, output

INSTALL = 'pip install -e ".[demo]"'
DESCRIPTION = (
    "A local web page over run and checkpoint folders: reconstructions beside their originals, generated and edited "
    "images, answers of a tokenizer exported into InternVL, a run's curves and validation grids while it trains. "
    "Serves on 127.0.0.1 (this machine only) unless --host says otherwise. See docs/demo.md."
)
LOCAL_HOSTS = ("localhost",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unilip-demo", description=DESCRIPTION)
    parser.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help="run folders (runs/<name>/tokenizer/stage1, a folder of runs), saved tokenizers or generators, "
        "checkpoints (.ckpt, a released .pth with --preset), InternVL exports",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="generator / InternVL")
    parser.add_argument("--preset", default=None, help="tokenizer preset of a released .pth: unilip_1b or unilip_2b")
    parser.add_argument("--refresh", type=float, default=5.0, help="seconds between re-reads of a followed run")
    return parser


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def announce(host: str, port: int) -> str:
    """The line that says where the page is and who can open it."""
    shown = "127.0.0.1" if host == "localhost" else host
    url = f"http://{shown}:{port}"
    if is_local(host):
        return f"unilip demo: {url} (only this machine can open it; --host 0.0.0.0 serves other machines)"
    return f"unilip demo: {url} on {host}: anyone who can reach this machine on port {port} can use it (no login)"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    cli_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to the page it serves
    with one_line_errors():
        if args.refresh <= 0:
            raise ConfigError(f"--refresh {args.refresh}: give a positive number of seconds")
        from unilip.demo.sources import find_sources

        sources = find_sources(args.folders)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ConfigError(f"the demo needs Gradio, an optional extra: {INSTALL}") from None
    import torch

    from unilip.demo.app import Options, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = Options(device=device, dtype=args.dtype, preset=args.preset, refresh_seconds=args.refresh)
    logging.getLogger("unilip.demo").info("%s", sources.summary())
    app = build_app(sources, options)
    with one_line_errors():
        try:
            app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                       ssr_mode=False, show_error=False)  # fmt: skip
        except OSError as error:  # the port is taken
            shutil.rmtree(options.downloads, ignore_errors=True)
            raise ConfigError(f"cannot serve on {args.host}:{args.port} ({error}); choose another --port") from None
    output(__name__).info(announce(args.host, app.server_port))
    try:
        app.block_thread()
    finally:
        app.close()
        shutil.rmtree(options.downloads, ignore_errors=True)
