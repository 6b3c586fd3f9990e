"""What fedmerge writes on a terminal: its own stages and log lines, libraries only when asked.

Four levels, set once per process by ``setup`` (the CLI does it before any heavy import):

* ``QUIET`` (``-q``): errors only, for scripts; a command's result (its table) still goes to stdout;
* ``NORMAL``: one progress bar per stage, fedmerge's info lines and every warning of its own;
* ``VERBOSE`` (``-v``): debug lines too, and the libraries' own logging, warnings and progress bars
  (lm-eval, transformers, datasets, huggingface_hub) as they print them;
* ``DEBUG`` (``-vv``): libraries' debug lines as well.

Below ``VERBOSE`` the libraries are silenced (``quiet_libraries``): through their own switches
(environment variables read at import, their logging and progress-bar functions once imported) and
a logging filter that lets a library's record through only when it is an error. fedmerge's own
output is a ``stage``: a tqdm bar on a terminal, one summary line when the stream is not a
terminal (a log file, a pipe), nothing when quiet. Log lines are written through the bars, so
they never land inside one.

Other parts use only this module's functions::

    from fedmerge import console

    with console.stage("merge ties", total=n_tensors, unit="tensor") as st:
        for ...:
            st.advance()
    with console.stage("write") as st:   # no total: a timer, then "write: 3 shards, done in 1.2 s"
        ...
        st.note("3 shards")
    with console.stage("score models", total=len(models), unit="models") as outer:
        for m in models:
            evaluator.evaluate(m)           # its own stages show while they run, then give way
            outer.advance()
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

QUIET = -1
NORMAL = 0
VERBOSE = 1
DEBUG = 2

# Libraries' switches that are read from the environment when they are imported (and inherited
# by child processes). Set only when not already set, so a person's own choice wins.
_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # tokenizers prints a warning when a process forks after using it in parallel.
    "TOKENIZERS_PARALLELISM": "false",
}
_OWN_LOGGERS = ("fedmerge", "__main__")


class _State:
    verbosity: int = NORMAL
    depth: int = 0  # stages open right now (a stage inside another is shown only while it runs)
    stream: TextIO | None = None  # None: whatever sys.stderr is at the time of writing
    handler: logging.Handler | None = None
    env_set: dict[str, str] = {}
    details: list[str] = []  # fedmerge loggers whose info lines are details for now (see ``details``)


def verbosity() -> int:
    """The level ``setup`` set (``NORMAL`` if it was never called)."""
    return _State.verbosity


def libraries_quiet() -> bool:
    """Whether libraries' logging, warnings and progress bars are to be silenced."""
    return _State.verbosity < VERBOSE


def verbosity_from_args(args: Any) -> int:
    """The level asked for on a command line: ``args.quiet`` and ``args.verbose`` (bool or count)."""
    if getattr(args, "quiet", False):
        return QUIET
    verbose = getattr(args, "verbose", 0) or 0
    return min(DEBUG, int(verbose))


def _stream() -> TextIO:
    return _State.stream if _State.stream is not None else sys.stderr


def write_line(text: str) -> None:
    """Write one line of fedmerge's own output to the console stream, through any active bar."""
    stream = _stream()
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        tqdm.write(text, file=stream)
    else:
        stream.write(text + "\n")
    stream.flush()


class _ConsoleHandler(logging.Handler):
    """Writes records through the progress bars; lets a library's record pass only when asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return False
        own = record.name in _OWN_LOGGERS or any(record.name.startswith(f"{n}.") for n in _OWN_LOGGERS)
        if own:
            detail = record.levelno < logging.WARNING and any(_under(record.name, n) for n in _State.details)
            return not detail or _State.verbosity >= VERBOSE
        if record.levelno >= logging.ERROR:
            return True
        level = _State.verbosity
        return level >= DEBUG or (level >= VERBOSE and record.levelno >= logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record))
        except Exception:  # a broken stream must not turn a log call into a crash
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Plain lines by default (``warning: ...``); time, level and logger name when verbose."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and _State.verbosity >= VERBOSE:
            message += "\n" + self.formatException(record.exc_info)
        if _State.verbosity >= VERBOSE:
            return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} {record.name}: {message}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def setup(level: int = NORMAL, *, stream: TextIO | None = None) -> None:
    """Configure logging and library noise for this process; calling it again replaces the setup.

    ``stream`` is where fedmerge's bars and log lines go (default: ``sys.stderr`` at the time of
    each write). Results a command prints on stdout are not affected.
    """
    _State.verbosity = max(QUIET, min(DEBUG, int(level)))
    _State.stream = stream
    root = logging.getLogger()
    if _State.handler is not None:
        root.removeHandler(_State.handler)
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    _State.handler = handler
    root.setLevel(logging.ERROR if level <= QUIET else logging.INFO if level == NORMAL else logging.DEBUG)
    # Python warnings become log records, so the same rule decides whether they are shown.
    logging.captureWarnings(True)
    if libraries_quiet():
        quiet_libraries()
    else:
        _unquiet_libraries()


def quiet_libraries() -> None:
    """Silence the libraries fedmerge drives: environment switches and, once imported, their APIs.

    Idempotent and cheap; parts call it again right after importing such a library lazily.
    """
    for key, value in _LIBRARY_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _State.env_set[key] = value
    modules = sys.modules
    if "transformers" in modules:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    if "datasets" in modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    if "huggingface_hub" in modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _unquiet_libraries() -> None:
    """Undo ``quiet_libraries`` (for ``-v``): only what this module itself set."""
    for key, value in list(_State.env_set.items()):
        if os.environ.get(key) == value:
            del os.environ[key]
        del _State.env_set[key]
    modules = sys.modules
    if "transformers" in modules:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_info() if _State.verbosity >= DEBUG else tf_logging.set_verbosity_warning()
        tf_logging.enable_progress_bar()
    if "datasets" in modules:
        import datasets

        datasets.utils.logging.set_verbosity_warning()
        # datasets reads its switch from the environment once, at import; it then wins for good.
        if not datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS:
            datasets.enable_progress_bars()
    if "huggingface_hub" in modules:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(f"{prefix}.")


@contextmanager
def details(*loggers: str) -> Iterator[None]:
    """While inside, the info lines of these fedmerge loggers are details, shown only with ``-v``.

    For a command that tells its own story of work other parts do (``fedmerge demo`` narrates
    the federation's rounds): their warnings and errors still show; nothing is changed on the
    loggers themselves, so other handlers (a log file) still get every record.
    """
    _State.details.extend(loggers)
    try:
        yield
    finally:
        for name in loggers:
            _State.details.remove(name)


class Stage:
    """One unit of fedmerge's work with a progress bar; made by ``stage``."""

    def __init__(self, name: str, total: int | None, unit: str, nested: bool = False):
        self.name = name
        self.total = total
        self.unit = unit
        self.count = 0
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.nested = nested
        self._bar = None
        stream = _stream()
        self._shown = _State.verbosity > QUIET
        self._interactive = self._shown and bool(getattr(stream, "isatty", lambda: False)())
        if self._interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit, file=stream, leave=not nested, dynamic_ncols=True,
                             disable=False, mininterval=0.2)

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def set_total(self, total: int | None) -> None:
        """Size the bar once the amount of work is known (e.g. the number of requests)."""
        self.total = total
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.update(self.count)

    def note(self, text: str) -> None:
        """Add a few words to the stage's closing line (e.g. 'reused', '3 shards')."""
        self.notes.append(text)
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(self.notes), refresh=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self, failed: bool = False) -> str:
        done = f"{self.count}/{self.total} {self.unit}" if self.total is not None else None
        parts = [p for p in (done, *self.notes) if p]
        what = "stopped after" if failed else "done in"
        return f"{self.name}: " + ", ".join(parts + [f"{what} {self.seconds:.1f} s"])

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._shown and not self.nested:
            write_line(self.summary(failed))


@contextmanager
def stage(name: str, total: int | None = None, unit: str = "it") -> Iterator[Stage]:
    """A stage of work: a bar on a terminal, one summary line elsewhere, nothing when quiet.

    A stage opened inside another (a model scored within "score 17 models") is a bar only while
    it runs and leaves no line: the outer stage speaks for it.
    """
    st = Stage(name, total, unit, nested=_State.depth > 0)
    _State.depth += 1
    try:
        yield st
    except BaseException:
        st.close(failed=True)
        raise
    finally:
        _State.depth -= 1
    st.close()


__all__ = [
    "QUIET", "NORMAL", "VERBOSE", "DEBUG", "setup", "verbosity", "verbosity_from_args", "libraries_quiet",
    "quiet_libraries", "stage", "Stage", "write_line", "details",
]
