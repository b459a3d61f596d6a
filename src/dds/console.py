"""What every `dds` entry point shares: a one-line-error argument parser and the process-wide
settings that only an entry point may make (library code never changes them)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def configure_process() -> None:
    """Set once, by an entry point, before torch loads: environment defaults and warnings."""
    # Busy-waiting OpenMP threads slow every torch call many times over on a shared CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"dds: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # dds.images refuses images over its own (lower) pixel limit itself, from the header.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
