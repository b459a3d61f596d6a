"""Registry of subcommands beyond `edit`; each entry adds its parser to the `dds` command."""

from __future__ import annotations


def _demo(sub):
    from dds.demo import add_parser

    add_parser(sub)


def _eval(sub):
    from dds.eval.cli import add_parser

    add_parser(sub)


def _ui(sub):
    from dds.ui.cli import add_parser

    add_parser(sub)


def _translate(sub):
    from dds.translate.cli import add_parser

    add_parser(sub)


# Commands with their own argument parser: `dds NAME ...` hands the rest of the line to them.
DELEGATED = {
    "train-builtin": ("dds.builtin.train", "train the built-in model (VAE, then UNet + text encoder)"),
    "translate-train": ("dds.translate.train", "train a one-pass translation network with DDS (Section 4)"),
}


def _delegated(sub):
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)


REGISTRY: list = [_demo, _eval, _ui, _translate, _delegated]
