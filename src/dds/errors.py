"""User-facing errors: one sentence that says what was wrong and what to do."""


class DDSError(ValueError):
    """An error caused by the user's input; the CLI prints it as one line and exits with 2."""
