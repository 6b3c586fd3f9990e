"""What a person sees: ``fedmerge eval`` prints its own lines only, libraries only with -v, errors
only with -q; and the console module's rules for log lines and stages."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval_helpers import ITEMS_PER_TASK
from fedmerge import console

REPO = Path(__file__).resolve().parents[2]
# Switches a person might have set that would hide library output: the test clears them, so what
# it sees silenced is silenced by fedmerge.
_LIBRARY_SWITCHES = ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                     "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM")


def _run_eval(workdir: Path, model: Path, folder: Path, *flags: str, extra_env: dict | None = None, tasks="toy_medqa,toy_hellaswag"):
    env = {k: v for k, v in os.environ.items() if k not in _LIBRARY_SWITCHES}
    env.update(PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(workdir / "hf-datasets"), GIT_CEILING_DIRECTORIES=str(workdir.parent),
               **(extra_env or {}))
    cmd = [sys.executable, "-m", "fedmerge", *flags, "eval", str(model), "--tasks", tasks, "--task-dir", str(folder),
           "--num-fewshot", "2", "--device", "cpu", "--threads", "1", "--store", str(workdir / "r.db")]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def workdir(tmp_path):
    """A working directory outside any git repository: lm-eval's git probe fails there."""
    probe = subprocess.run(["git", "describe", "--always"], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert probe.returncode != 0 and "not a git repository" in probe.stderr  # what lm-eval's own probe would print
    return tmp_path


STDOUT = [
    r"task +metric +value +stderr +n +version",
    *[rf"{t} +{m} +\d\.\d{{4}} +\d\.\d{{4}} +{ITEMS_PER_TASK} +\d\.0" for t in ("toy_medqa", "toy_hellaswag") for m in ("acc", "acc_norm")],
]
# 2 tasks x 6 items x 4 choices: one request per choice.
STDERR = [
    r"load tasks: 2/2 tasks, done in \d+\.\d s",
    r"load model: tiny, done in \d+\.\d s",
    r"score tiny: 48/48 requests, mean acc \d\.\d{4} over 2 task\(s\), done in \d+\.\d s",
    r"tiny: 2-shot, all items, seed 1234",
    r"stored 4 score\(s\) in .*r\.db \(run [0-9a-f]{32}\)",
]


def _match(lines: list[str], patterns: list[str]) -> None:
    assert len(lines) == len(patterns), "\n".join(lines)
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.slow
def test_default_output_holds_only_fedmerges_lines(workdir, tiny_model, local_tasks):
    folder, _ = local_tasks
    done = _run_eval(workdir, tiny_model, folder)
    assert done.returncode == 0, done.stderr
    _match(done.stdout.splitlines(), STDOUT)
    _match(done.stderr.splitlines(), STDERR)
    assert "\r" not in done.stderr  # no progress bar redrawn into a log


@pytest.mark.slow
def test_verbose_shows_the_libraries_but_not_gits_complaint(workdir, tiny_model, local_tasks):
    folder, _ = local_tasks
    done = _run_eval(workdir, tiny_model, folder, "-v")
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert re.search(r"INFO lm_eval\.evaluator: Setting random seed to 1234", err)  # lm-eval's own logging
    # lm-eval's, datasets' and transformers' bars
    assert "Running loglikelihood requests: 100%" in err and "Generating test split" in err and "Loading weights" in err
    assert not any(line.startswith("fatal:") for line in err.replace("\r", "\n").splitlines())
    assert re.search(r"DEBUG fedmerge\.eval\.lmeval: git probe: fatal: not a git repository", err)  # kept, as a debug line
    _match(done.stdout.splitlines(), STDOUT)

    # TQDM_DISABLE=1 now silences lm-eval's request bars too (they pass disable=False explicitly).
    quiet_bars = _run_eval(workdir, tiny_model, folder, "-v", extra_env={"TQDM_DISABLE": "1"})
    assert quiet_bars.returncode == 0
    assert "%|" not in quiet_bars.stderr and "it/s]" not in quiet_bars.stderr  # no tqdm bar at all
    assert "INFO lm_eval.evaluator" in quiet_bars.stderr


@pytest.mark.slow
def test_quiet_prints_the_result_and_errors_only(workdir, tiny_model, local_tasks):
    folder, _ = local_tasks
    done = _run_eval(workdir, tiny_model, folder, "-q")
    assert done.returncode == 0 and done.stderr == ""
    _match(done.stdout.splitlines(), STDOUT)
    bad = _run_eval(workdir, tiny_model, folder, "-q", tasks="toy_medqa,cardiology")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("fedmerge eval: error: task 'cardiology' is neither")


# ----------------------------------------------------------------------------- the console module


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def stream():
    out = io.StringIO()
    yield out
    console.setup(console.NORMAL)  # back to the process default for the other tests


def test_log_lines_own_and_libraries(stream):
    console.setup(console.NORMAL, stream=stream)
    logging.getLogger("fedmerge.demo").info("merged %d models", 3)
    logging.getLogger("fedmerge.demo").warning("slow disk")
    logging.getLogger("somelib.evaluator").info("Setting random seed")
    logging.getLogger("somelib.evaluator").warning("Overwriting default num_fewshot")
    logging.getLogger("somelib.models").error("cannot load")
    logging.getLogger("fedmerge.demo").debug("details")
    assert stream.getvalue().splitlines() == ["merged 3 models", "warning: slow disk", "error: cannot load"]

    stream.seek(0)
    stream.truncate()
    console.setup(console.QUIET, stream=stream)
    logging.getLogger("fedmerge.demo").info("merged")
    logging.getLogger("fedmerge.demo").warning("slow disk")
    logging.getLogger("fedmerge.demo").error("failed")
    assert stream.getvalue().splitlines() == ["error: failed"]
    assert console.libraries_quiet()

    stream.seek(0)
    stream.truncate()
    console.setup(console.VERBOSE, stream=stream)
    logging.getLogger("somelib.evaluator").info("Setting random seed")
    logging.getLogger("somelib.evaluator").debug("too much")
    logging.getLogger("fedmerge.demo").debug("details")
    lines = stream.getvalue().splitlines()
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", ln) for ln in lines] == [
        "INFO somelib.evaluator: Setting random seed", "DEBUG fedmerge.demo: details"]
    assert not console.libraries_quiet()


def test_python_warnings_follow_the_same_rule():
    """A library's Python warning is a log record: hidden by default, shown with -v."""
    code = ("import sys, warnings; from fedmerge import console; console.setup(int(sys.argv[1])); "
            "warnings.warn('torch_dtype is deprecated', FutureWarning)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.run([sys.executable, "-c", code, str(v)], env=env, capture_output=True, text=True, timeout=60) for v in (0, 1)]
    assert runs[0].returncode == 0 and runs[0].stderr == ""
    assert re.search(r"WARNING py\.warnings: .*FutureWarning: torch_dtype is deprecated", runs[1].stderr)


def test_stage_lines_on_a_log_stream(stream):
    console.setup(console.NORMAL, stream=stream)
    with console.stage("merge ties", total=3, unit="tensors") as st:
        for _ in range(3):
            st.advance()
        st.note("2 shards")
    with pytest.raises(RuntimeError):
        with console.stage("write") as st:
            raise RuntimeError("disk full")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"merge ties: 3/3 tensors, 2 shards, done in \d+\.\d s", lines[0])
    assert re.fullmatch(r"write: stopped after \d+\.\d s", lines[1]) and len(lines) == 2

    console.setup(console.QUIET, stream=stream)
    with console.stage("silent", total=1) as st:
        st.advance()
    assert len(stream.getvalue().splitlines()) == 2


def test_a_stage_inside_another_leaves_no_line(stream):
    console.setup(console.NORMAL, stream=stream)
    with console.stage("score models", total=2, unit="models") as outer:
        for label in ("base", "ties"):
            with console.stage(f"score {label}", total=3, unit="requests") as inner:
                inner.advance(3)
            outer.advance()
    with console.stage("report"):
        pass
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"score models: 2/2 models, done in \d+\.\d s", lines[0]) and lines[1].startswith("report: done in")


def test_log_lines_go_through_a_terminal_bar():
    tty = _Tty()
    try:
        console.setup(console.NORMAL, stream=tty)
        with console.stage("score base", total=10, unit="requests") as st:
            st.advance(4)
            logging.getLogger("fedmerge.eval").info("halfway there")
            st.set_total(20)
            st.advance(16)
    finally:
        console.setup(console.NORMAL)
    out = tty.getvalue()
    # The log line stands alone (the bar is cleared before it and redrawn after), never inside a bar.
    assert "halfway there\n" in out
    assert any(seg.split("\r")[-1] == "halfway there" for seg in out.split("\n"))
    assert "score base" in out and "20/20" in out


def test_verbosity_from_args():
    from argparse import Namespace

    assert console.verbosity_from_args(Namespace(quiet=True, verbose=True)) == console.QUIET
    assert console.verbosity_from_args(Namespace(quiet=False, verbose=False)) == console.NORMAL
    assert console.verbosity_from_args(Namespace(verbose=True)) == console.VERBOSE
    assert console.verbosity_from_args(Namespace(verbose=3)) == console.DEBUG
    assert console.verbosity_from_args(Namespace()) == console.NORMAL


def test_quiet_libraries_uses_their_own_switches(monkeypatch, stream):
    for key in _LIBRARY_SWITCHES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a person's own choice is kept
    import transformers
    from transformers.utils import logging as tf_logging

    console.setup(console.NORMAL, stream=stream)
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert tf_logging.get_verbosity() == tf_logging.ERROR and not tf_logging.is_progress_bar_enabled()
    console.setup(console.VERBOSE, stream=stream)
    assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert tf_logging.is_progress_bar_enabled()
    assert transformers.__version__
