"""`dds ui`: a local web page for interactive DDS editing with a live preview.

The editing logic (`EditSession`) is plain Python and needs nothing beyond the library;
`build_app` wraps it in a Gradio page and needs the `ui` extra (`pip install 'dds[ui]'`).
"""

from dds.ui.app import EditSession, EditUpdate, Example, build_app, bundled_examples, launch

__all__ = ["EditSession", "EditUpdate", "Example", "build_app", "bundled_examples", "launch"]
