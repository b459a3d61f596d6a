"""The page's words: its field labels, library sentences said in them, and the status line.

The library names settings as the command line does (`--target`, `lr`); the page names them as
its own labels ("the Target prompt box", "Learning rate").  Every message the page shows goes
through `page_sentence`, so there is one style: one sentence, the page's labels.
"""

from __future__ import annotations

import html
import re

from dds.errors import SettingError

# EditConfig / request field -> the label of its page control
LABELS = {"method": "Method", "steps": "Steps", "guidance": "Guidance", "lr": "Learning rate",
          "seed": "Seed", "size": "Size", "source": "Source prompt", "target": "Target prompt",
          "schedule": "Schedule", "step_rule": "Step size", "average_tail": "Tail average"}
_BOXES = {"source": "the Source prompt box", "target": "the Target prompt box"}
# library wording -> page wording (applied in order)
_PHRASES = [
    ("the target prompt is empty", "the Target prompt box is empty"),
    ("the source prompt is empty", "the Source prompt box is empty"),
    (" with --target", ""),
    (" (--source)", ""),
    ("the learning rate (lr)", "the Learning rate"),
    ("lower the guidance", "lower the Guidance"),
]
_FLAG = re.compile(r"--([a-z][a-z-]*)")

STOPPING = "Stopping after the current step…"
NO_EDIT = "No edit is running or waiting in this page."
CANCELLED_QUEUED = "Cancelled: the edit was still waiting in the queue, so no step ran."


def one_sentence(e: BaseException | str) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def page_sentence(e: BaseException | str) -> str:
    """A library error (or sentence) as one sentence in the page's words."""
    if isinstance(e, SettingError):
        e = e.relabel(LABELS.get(e.field, e.field))
    text = str(e)
    for old, new in _PHRASES:
        text = text.replace(old, new)

    def flag(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return _BOXES.get(name) or f"the {LABELS[name]} field" if name in LABELS else m.group(0)

    return one_sentence(_FLAG.sub(flag, text))


def error_markdown(sentence: str, before_run: bool = True) -> str:
    """An error in the status line: refused before any step, or failed while running."""
    head = "Cannot edit:" if before_run else "Edit failed:"
    return f"**{head}** {sentence}"


def notes_markdown(notes) -> str:
    """`PreparedEdit.notes` as lines of the status line (things to know, not errors)."""
    return "\n\n".join(f"**Note:** {one_sentence(n)}" for n in notes)


def join_lines(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def progress_html(step: int, total: int, state: str, elapsed: float | None = None,
                  ahead: int = 0) -> str:
    """A progress bar whose data attributes carry the state (idle, queued, running, done,
    stopped, cancelled, refused, failed) and, while queued, the edits ahead."""
    pct = 100 * step / total if total else 100
    if state == "refused":
        text = "not started"
    elif state == "queued":
        edits = "edit" if ahead == 1 else "edits"
        text = f"queued: {ahead} {edits} ahead"
    else:
        label = {"running": "editing", "idle": "ready"}.get(state, state)
        secs = f" · {elapsed:.1f} s" if elapsed is not None else ""
        text = f"{label}: step {step} of {total}{secs}"
    return (f'<div id="dds-progress" data-state="{state}" data-step="{step}" '
            f'data-total="{total}" data-ahead="{ahead}"><progress max="{total}" '
            f'value="{step}" style="width:100%">{pct:.0f}%</progress>'
            f"<div>{html.escape(text)}</div></div>")
