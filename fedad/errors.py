"""One exception type for user errors, and the clean exit that reports it."""

from __future__ import annotations

import sys
import textwrap


class FedadError(Exception):
    """A mistake the user can fix: a bad path, column, config value or input file.

    The message is one paragraph that names what was wrong and how to fix it.
    Entry points print it without a traceback and exit non-zero.
    """


class JobSkipped(FedadError):
    """A setting valid in itself that the chosen method cannot serve: a sweep skips the job.

    A robust strategy asked to tolerate more attackers than its bound allows is
    one. A single run still ends with the message (status 2); in a multirun the
    job is recorded as skipped, with the reason, and the sweep goes on.
    """


def exit_with(error: FedadError, code: int = 2) -> None:
    """Print ``error`` as one wrapped paragraph on stderr and exit with ``code``."""
    text = " ".join(str(error).split())
    # Paths and keys must stay copyable, so never split a word or at a hyphen.
    body = textwrap.fill(
        text, width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )
    print("fedad: error: " + body, file=sys.stderr)
    raise SystemExit(code)
