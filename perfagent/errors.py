"""The package's exception hierarchy.

Every failure that a user can cause or meet (bad flags, a missing capability,
a malformed binary) is one of these, so the CLI can print one line and exit
with the right code instead of a traceback.
"""


class PerfAgentError(Exception):
    """Base of every error the package raises on purpose.

    ``exit_code`` is what the CLI exits with when this reaches it.
    """

    exit_code = 1


class UsageError(PerfAgentError):
    """A bad command-line value; the message names the flag."""

    exit_code = 2


class ParseError(PerfAgentError):
    """Malformed or truncated input in some binary format (ELF, perf records, pprof)."""


class ELFError(ParseError):
    """Malformed or truncated ELF input; the file's frames fall back to addresses."""


class ProfileFormatError(ParseError):
    """Bytes that are not a (gzip'd) pprof profile."""


class CaptureError(PerfAgentError):
    """A run-time failure of the capture (permission, no such process, ...)."""
