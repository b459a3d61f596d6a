"""`dds ui`: a local web page for interactive DDS editing with a live preview.

The editing (`EditSession`, in `dds.ui.session`) is plain Python and needs nothing beyond the
library; `build_app` (in `dds.ui.app`) lays it out as a Gradio page and needs the `ui` extra
(`pip install 'dds[ui]'`).
"""

from dds.ui.app import build_app, launch
from dds.ui.examples import Example, bundled_examples
from dds.ui.session import EditSession, EditUpdate

__all__ = ["EditSession", "EditUpdate", "Example", "build_app", "bundled_examples", "launch"]
