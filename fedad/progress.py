"""Progress of a run's slow steps: a live bar on a terminal, one log line per step elsewhere."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

log = logging.getLogger("fedad")


@dataclass
class Step:
    """One step under way; ``note`` (e.g. ``"macro-F1 0.957"``) ends its closing line."""

    name: str
    note: str = ""


def clock(seconds: float) -> str:
    """Seconds as ``m:ss`` (``h:mm:ss`` from an hour on), as a progress display shows them."""
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Steps:
    """A counted group of steps, such as the baselines of a run; open each with :meth:`step`."""

    def __init__(self, what: str, total: int, bar: Progress | None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.bar = bar
        self.task = bar.add_task(what, total=total) if bar is not None else None

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time one step; log ``<what> i/n: <name> done in <s> s (<note>)`` when it ends.

        Parameters
        ----------
        name : str
            What the step works on (a model name).

        Yields
        ------
        Step
            Set its ``note`` to add a result to the closing line.
        """
        current = Step(name)
        if self.bar is not None and self.task is not None:  # set together
            self.bar.update(self.task, description=f"{self.what}: {name}")
        started = time.perf_counter()
        yield current
        self.done += 1
        seconds = time.perf_counter() - started
        count = f" {self.done}/{self.total}" if self.total > 1 else ""
        label = f"{name} done" if name else "done"
        note = f" ({current.note})" if current.note else ""
        log.info("%s%s: %s in %.1f s%s", self.what, count, label, seconds, note)
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1)


@contextmanager
def steps(what: str, total: int) -> Iterator[Steps]:
    """Show a group of ``total`` steps: a live bar on a terminal, a log line per step always.

    The bar (name of the current step, count, elapsed time) is drawn only
    when standard error is a terminal outside a Hydra multirun; log lines go
    wherever the logging configuration sends them (the console and the job's
    log file), above the bar while it shows.

    Parameters
    ----------
    what : str
        The group, e.g. ``"baselines"``.
    total : int
        How many steps it has.

    Yields
    ------
    Steps
    """
    if not _live():
        yield Steps(what, total, None)
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        # Prints meant for a file or a pipe stay there rather than joining the display.
        redirect_stdout=sys.stdout.isatty(),
    )
    global _showing
    _showing = True
    try:
        with bar, _logs_through(bar.console):
            yield Steps(what, total, bar)
    finally:
        _showing = False


@contextmanager
def step(what: str) -> Iterator[Step]:
    """Show one step: a live spinner with its elapsed time on a terminal, then one log line.

    Parameters
    ----------
    what : str
        The step, e.g. ``"data"``; the closing line reads ``<what>: done in <s> s``.

    Yields
    ------
    Step
        Set its ``note`` to add a result to the closing line.
    """
    with steps(what, 1) as group, group.step("") as current:
        yield current


_showing = False


def _live() -> bool:
    """Draw a live display: on a terminal, outside a multirun, and not inside another display."""
    if _showing or not Console(stderr=True).is_terminal:
        return False
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)


@contextmanager
def _logs_through(console: Console) -> Iterator[None]:
    """Send the terminal's log handlers through the live display, so lines print above it."""
    handlers = [
        h
        for h in {*logging.getLogger().handlers, *log.handlers}
        if isinstance(h, logging.StreamHandler) and _is_terminal(h.stream)
    ]
    before = [h.setStream(_AboveBar(console)) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, before, strict=True):
            handler.setStream(stream)


class _AboveBar(io.TextIOBase):
    """A text stream that prints each write above a live display, unwrapped as a terminal would."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        self.console.print(Text(text.removesuffix("\n")), soft_wrap=True)
        return len(text)


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
