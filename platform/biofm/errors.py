"""Errors biofm reports to people. The CLI prints their message and exits non-zero."""


class BiofmError(Exception):
    """An error with a message meant for the person running the job."""


class ConfigError(BiofmError, ValueError):
    """A config file or value is invalid; the message names the file and the key."""


class SourceUnreachable(BiofmError):
    """The recording source cannot be reached at all (no network, wrong URL, missing folder)."""


class NothingProduced(BiofmError):
    """A job finished without producing any output; the message says why."""


class CaseSkipped(Exception):
    """One recording cannot be used. ``code`` groups reasons in the manifest; ``detail`` says why.

    ``retryable`` marks transient causes (network, server errors): a rerun tries the case again.
    """

    def __init__(self, code: str, detail: str, retryable: bool = False):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail, self.retryable = code, detail, retryable
