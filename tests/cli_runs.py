"""Run `specdec` in a subprocess as a terminal would, and signal it once its output shows it is under way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Interrupted:
    returncode: int
    stdout: list[str]  # its lines
    stderr: str
    seconds: float  # from the signal to the exit


def signal_after_lines(argv: list[str], lines: int, sig: int, group: bool, timeout: float = 30) -> Interrupted:
    """Start `python -m specdec argv` in a session of its own, wait until it has written `lines` lines to stdout,
    then send `sig` to it (group: to its whole process group, as Ctrl-C in a terminal does) and wait up to
    `timeout` seconds for the end. SIGINT starts out at its default: a background shell ignores it, and Python then
    never raises KeyboardInterrupt. (stderr is read from the signal on: the runs here write little before it.)"""
    p = subprocess.Popen([sys.executable, "-m", "specdec", *argv], cwd=Path(__file__).parents[1], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    try:
        while len(out) < lines:
            line = p.stdout.readline()
            if not line:
                raise AssertionError(f"exited ({p.wait()}) after {len(out)} lines: {out}\n{p.stderr.read()}")
            out.append(line)
        got: dict[str, str] = {}
        readers = [threading.Thread(target=lambda f=f: got.__setitem__(f, getattr(p, f).read()), daemon=True)
                   for f in ("stdout", "stderr")]
        (os.killpg if group else os.kill)(p.pid, sig)
        t0 = time.perf_counter()
        for r in readers:
            r.start()
        p.wait(timeout)
        seconds = time.perf_counter() - t0
        for r in readers:
            r.join()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return Interrupted(p.returncode, [x.rstrip("\n") for x in out + got["stdout"].splitlines()], got["stderr"],
                       seconds)
