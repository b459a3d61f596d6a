"""User-facing errors: one sentence that says what was wrong and what to do."""


class DDSError(ValueError):
    """An error caused by the user's input; the CLI prints it as one line and exits with 2."""


class SettingError(DDSError):
    """A setting out of its range.  `field` names it (e.g. "steps"), so that each frontend can
    say it in its own words (`--steps` on the command line, "Steps" in the web app)."""

    def __init__(self, field: str, value, why: str, label: str | None = None):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"{label or field} = {value!r} is invalid: {why}")

    def relabel(self, label: str) -> "SettingError":
        """The same error, naming the field as `label`."""
        return SettingError(self.field, self.value, self.why, label)


class DivergedError(DDSError):
    """The optimisation blew up (infinite, NaN or exploding latents); nothing is written."""
