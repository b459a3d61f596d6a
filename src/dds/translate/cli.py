"""`dds translate` (apply a trained network) and `dds translate-eval` (score it on the world).

Register with `dds.commands.REGISTRY.append(...)` of a function calling `add_parser(sub)`;
training is the delegated command `translate-train` (module `dds.translate.train`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dds.errors import DDSError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _inputs(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DDSError(f"folder '{src}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not src.exists():
        raise DDSError(f"input '{src}' does not exist; give an image file or a folder of images")
    return [src]


def cmd_translate(args) -> int:
    from dds.images import save_png
    from dds.pipeline import as_image
    from dds.translate.network import Translator

    if args.batch_size < 1:
        raise DDSError(f"--batch-size {args.batch_size} is invalid: it must be >= 1")
    src = Path(args.input)
    files = _inputs(src)
    if src.is_dir():
        out_dir = Path(args.out or f"{src.name}-{args.task}")
        outs = [out_dir / f"{p.stem}-{args.task}.png" for p in files]
    else:
        outs = [Path(args.out or f"{src.stem}-{args.task}.png")]
        if outs[0].suffix.lower() != ".png":
            raise DDSError(f"output '{outs[0]}' must end in .png")
    inputs = {p.resolve() for p in files}
    for o in outs:
        if o.resolve() in inputs:
            raise DDSError(f"output '{o}' is an input image; choose another --out")
    images = [as_image(p) for p in files]  # every input is checked before any loading
    tr = Translator(args.model, base_model=args.base_model, device=args.device)
    tr.task_id(args.task)
    for s in range(0, len(files), args.batch_size):
        chunk = slice(s, s + args.batch_size)
        for im, out in zip(tr(images[chunk], args.task, args.batch_size), outs[chunk], strict=True):
            save_png(im, out, {"dds": f'{{"translate": "{args.task}", "model": "{args.model}"}}'})
            if not args.quiet:
                print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="edit images in one pass with a trained translation network",
        description="Apply a network trained with `dds translate-train` (paper Section 4): one "
        "forward pass per image. INPUT is an image or a folder of images.",
        epilog="example: dds translate scene.png --model runs/circle --task square --out sq.png",
    )
    p.add_argument("input", metavar="INPUT", help="image file or folder")
    p.add_argument("--model", required=True, help="run folder or checkpoint folder")
    p.add_argument("--task", required=True, help="task name (as given when training)")
    p.add_argument("--out", help="output PNG (single image) or folder")
    p.add_argument("--base-model", help="base model folder, if the checkpoint has no VAE copy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_translate)

    e = sub.add_parser(
        "translate-eval",
        help="score a translation network on the built-in world vs zero-shot DDS and SDEdit",
        description="Held-out world scenes per task (OLD:NEW shape or colour rules): judge "
        "success, PSNR to the ground truth, PSNR/SSIM outside the object, images/s, and mode "
        "collapse measures, with the no-edit and autoencoder round-trip floors and the network "
        "against each baseline edit by edit (95% intervals). Prints the report as markdown; "
        "--out writes it as JSON (every edit's metrics included) and as markdown beside it.",
    )
    e.add_argument("--model", required=True, help="run folder or checkpoint folder")
    e.add_argument("--n", type=int, default=32, help="held-out edits per task")
    e.add_argument("--baselines", default="dds,sdedit",
                   help="comma list of dds, sdedit ('' for the network alone)")
    e.add_argument("--sdedit-strength", type=float, default=0.6)
    e.add_argument("--dds-steps", type=int, help="zero-shot DDS steps (default: the model's)")
    e.add_argument("--base-model", help="base model folder (default: the one trained from)")
    e.add_argument("--judge", help="judge weights (default: the packaged judge)")
    e.add_argument("--out", help="write the JSON report here (and OUT with suffix .md)")
    e.add_argument("--quiet", action="store_true")

    def run_eval(args):
        from dds.translate.evaluate import main_eval

        if args.n < 1:
            raise DDSError(f"--n {args.n} is invalid: it must be >= 1")
        return main_eval(args)

    e.set_defaults(func=run_eval)

    c = sub.add_parser(
        "translate-compare",
        help="compare two translation networks edit by edit from their translate-eval reports",
        description="Paired differences (same held-out edits) between the networks of two "
        "`dds translate-eval --out` reports, per task and over all, with 95% intervals "
        "(paired t for means, Agresti-Min for success); an interval holding zero reads "
        "'no difference'.",
        epilog="example: dds translate-compare runs/full/eval.json runs/sds/eval.json "
        "--names full,sds",
    )
    c.add_argument("a", metavar="A", help="report of the first network (its JSON)")
    c.add_argument("b", metavar="B", help="report of the second network")
    c.add_argument("--names", help="two names for the table, comma-separated (default: A,B)")
    c.add_argument("--out", help="also write the comparison as JSON here")

    def run_compare(args):
        from dds.translate.evaluate import main_compare

        return main_compare(args)

    c.set_defaults(func=run_compare)
