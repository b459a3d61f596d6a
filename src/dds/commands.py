"""Registry of subcommands beyond `edit`; each entry adds its parser to the `dds` command."""

from __future__ import annotations

REGISTRY: list = []
