"""`dds ui`: start the editing web page (Gradio) on this machine.

Reached through `dds.cli.main`, which makes the process-wide settings
(`dds.console.configure_process`) once before this runs."""

from __future__ import annotations

import sys

from dds.errors import DDSError


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DDSError("the web app needs gradio; install it with pip install 'dds[ui]'") from None
    if args.concurrency < 1:
        raise DDSError(f"--concurrency {args.concurrency} is invalid: it must be a whole number >= 1")
    if args.port is not None and not 0 < args.port < 65536:
        raise DDSError(f"--port {args.port} is invalid: give a port from 1 to 65535")
    from dds.ui.app import build_app, launch

    demo = build_app(args.model, translator=args.translator, concurrency=args.concurrency)
    if args.share:
        print("dds ui: warning: --share makes the page reachable from the internet through a "
              "public link", file=sys.stderr)
    launch(demo, host=args.host, port=args.port, share=args.share, block=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="interactive editing in the browser, with a live preview",
        description=(
            "Serve a local web page for DDS/SDS editing: upload, paste or pick an image, give "
            "the source and target prompts, watch the edit take shape and stop it at any time. "
            "Needs the ui extra (pip install 'dds[ui]')."
        ),
        epilog="example: dds ui --model ./stable-diffusion-v1-5 --port 7860",
    )
    p.add_argument("--model", help="local diffusers model folder (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also create a public Gradio share link (off by default)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="edits that may run at once; they share one model (default 1)")
    p.add_argument("--translator", metavar="PATH",
                   help="trained one-pass translation network: adds a translation tab")
    p.set_defaults(func=cmd_ui)
