"""The two kinds of errors a user sees, so every entry point reports them the same way (one line, no traceback):
`UserError` — bad input, configuration or usage (the `scaffold` CLI exits 2) — and `RunFailed` — a stage or a quality
gate did nothing useful (exit 1). Each module's own errors subclass one of them."""


class UserError(ValueError):
    """Bad input, configuration or usage; the message names the file, line, field or setting."""


class RunFailed(RuntimeError):
    """A stage or a quality gate did nothing useful; the message says why and what to change."""


class StageFailed(RunFailed):
    """A stage did nothing useful (every item failed, was quarantined or was not covered); the message says why and
    what to change. What it did write (failures, quarantined rows) stays written."""
