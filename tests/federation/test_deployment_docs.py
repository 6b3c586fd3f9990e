"""docs/deployment.md, executed: the guide's blocks run in order, read from the guide itself.

A fenced block whose info string holds ``deploy`` is a step:

- ``bash deploy``: run with bash (``-e -o pipefail``) in the folder that holds ``consortium/``
  and the hospitals' folders;
- ``yaml deploy file=PATH``: written to PATH;
- ``per=HOSPITAL``: done once per hospital (hospital-a, hospital-b) with ``$HOSPITAL`` set, and
  in a YAML block ``hospital-a`` replaced by that hospital's id;
- ``background=NAME``: a daemon, left running; ``wait=TEXT``: the next step waits until it printed TEXT.

The guide's example addresses, ports and model folders are replaced by this test's own
(``coordinator.example.org`` by the "public" interface 127.0.0.2). Every ``bash`` block of the
guide is a step, but for ``bash setup`` (activating the environment, which this test provides).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deployment_helpers import PUBLIC_HOST, kill_leftovers, port_is_free, wait_until_gone
from fedtest_helpers import assert_same_tensors, offline_merge

from fedmerge.federation.supervision import free_port

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
HOSPITALS = ["hospital-a", "hospital-b"]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


@dataclass
class Step:
    lang: str
    body: str
    options: dict[str, str] = field(default_factory=dict)


def guide_steps(text: str) -> tuple[list[Step], list[str]]:
    """The guide's steps in order, and the info strings of its bash blocks that are neither step nor setup."""
    steps, stray = [], []
    for lang, info, body in FENCE.findall(text):
        words = info.split()
        if "deploy" in words:
            options = dict(w.split("=", 1) for w in words if "=" in w)
            steps.append(Step(lang, body, options))
        elif lang == "bash" and "setup" not in words:
            stray.append(info)
    return steps, stray


def test_the_guide_parser_reads_tags(tmp_path):
    text = "x\n```bash deploy per=HOSPITAL background=client-$HOSPITAL wait=ready:\ncd $HOSPITAL\nrun\n```\n```bash\nls\n```\n```bash setup\nsource x\n```\n```yaml deploy file=a/b.yaml\nk: v\n```\n"
    steps, stray = guide_steps(text)
    assert [(s.lang, s.body, s.options) for s in steps] == [
        ("bash", "cd $HOSPITAL\nrun\n", {"per": "HOSPITAL", "background": "client-$HOSPITAL", "wait": "ready:"}),
        ("yaml", "k: v\n", {"file": "a/b.yaml"}),
    ]
    assert stray == [""]


class GuideRun:
    def __init__(self, work: Path, toy_models):
        self.work = work
        self.public_port = free_port(PUBLIC_HOST)
        self.runtime_ports = {h: free_port() for h in HOSPITALS}
        self.toy = toy_models
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.daemons: dict[str, tuple[subprocess.Popen, Path]] = {}

    def substitute(self, text: str, hospital: str | None, yaml_block: bool) -> str:
        text = text.replace("0.0.0.0:9092", f"{PUBLIC_HOST}:{self.public_port}")
        text = text.replace("coordinator.example.org", PUBLIC_HOST).replace(":9092", f":{self.public_port}")
        text = text.replace("/models/base", str(self.toy.base))
        if hospital is not None and yaml_block:
            text = text.replace("hospital-a", hospital).replace("runtime_port: 9094", f"runtime_port: {self.runtime_ports[hospital]}")
        for h in HOSPITALS:
            text = text.replace(f"/models/{h}-finetune", str(self.toy.finetunes[h]))
        return text

    def run(self, step: Step) -> None:
        for hospital in [None] if "per" not in step.options else HOSPITALS:
            env = dict(self.env)
            if hospital is not None:
                env[step.options["per"]] = hospital
            body = self.substitute(step.body, hospital, step.lang == "yaml")
            if step.lang == "yaml":
                path = self.work / self.substitute(step.options["file"], hospital, True)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(body)
            elif "background" in step.options:
                name = step.options["background"].replace("$HOSPITAL", hospital or "")
                out = self.work / f"{name}.out"
                lines = body.strip().splitlines()
                script = "\n".join([*lines[:-1], f"exec {lines[-1]}"])  # the daemon itself gets the signals sent to it
                proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.work, env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT)
                self.daemons[name] = (proc, out)
                if "wait" in step.options:
                    self.wait_for(name, step.options["wait"], 300)
            else:
                proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=self.work, env=env, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"guide step failed ({hospital or 'consortium'}):\n{body}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    def output(self, name: str) -> str:
        return self.daemons[name][1].read_text(errors="replace")

    def wait_for(self, name: str, needle: str, timeout: float) -> None:
        proc, _ = self.daemons[name]
        deadline = time.monotonic() + timeout
        while needle not in self.output(name):
            assert proc.poll() is None, f"{name} exited with {proc.returncode} before printing {needle!r}:\n{self.output(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} did not print {needle!r}:\n{self.output(name)[-3000:]}"
            time.sleep(0.25)


def test_the_deployment_guide_runs_as_written(tmp_path, toy_models):
    steps, stray = guide_steps(GUIDE.read_text())
    assert stray == [], "a bash block of the guide is neither a step (deploy) nor setup"
    assert sum(s.options.get("background") == "coordinator" for s in steps) == 1
    work = tmp_path / "guide"
    work.mkdir()
    guide = GuideRun(work, toy_models)
    try:
        # The guide's order, with hospitals started while the coordinator is up (it may also come last).
        for step in steps:
            guide.run(step)
        coordinator, _ = guide.daemons["coordinator"]
        assert coordinator.wait(600) == 0, guide.output("coordinator")[-3000:]
        out = guide.output("coordinator")
        assert "registered 2 SuperNode key(s)" in out and "all 2 round(s) completed" in out
        offline = offline_merge(toy_models.base, [toy_models.finetunes[h] for h in HOSPITALS], tmp_path / "offline", {"method": "ties", "parameters": {"density": 0.5}})
        for h in HOSPITALS:
            current = work / h / "state" / "models" / "current"
            assert current.resolve().name == "round-0002"
            assert assert_same_tensors(current, offline) == 21
        # What the guide says about stopping a hospital after the last round.
        for h in HOSPITALS:
            proc, _ = guide.daemons[f"client-{h}"]
            assert proc.poll() is None  # still running, waiting for the next run
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 128 + signal.SIGTERM
            assert "fedmerge client: stopped by SIGTERM; the SuperNode and its ClientApps are stopped (log: " in guide.output(f"client-{h}")
        assert wait_until_gone(work, 30) == {}
        assert port_is_free(PUBLIC_HOST, guide.public_port)
    finally:
        for proc, _ in guide.daemons.values():
            if proc.poll() is None:
                proc.kill()
        kill_leftovers(work)
