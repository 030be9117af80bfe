"""Phases under time boxes, framework-free: each phase runs its commands as processes of their
own, none past the phase's box or the whole run's deadline, and the run's record
(`phases.json`) is rewritten after every change, so a run stopped at any point (a time-out
of the machine, a kill) leaves every finished phase, and the one in progress marked as such.

A phase gets `min(box, time left - what the phases after it reserve)`; one that would get
less than its own reserve is skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write_text

RECORD = "phases.json"


@dataclass
class Phase:
    name: str
    run: Callable[[PhaseContext], dict | None]  # returns what the record keeps about it (files it wrote, numbers)
    box_s: float  # at most this long
    reserve_s: float = 0.0  # the least time worth starting it with; phases before it leave this much
    what: str = ""  # one line for the record and the summary


@dataclass
class Command:
    """One process a phase ran: its command line, log, exit code, seconds and whether it was stopped."""

    argv: list[str]
    log: str
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False

    def as_dict(self) -> dict:
        return {
            "argv": self.argv,
            "log": self.log,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
        }


@dataclass
class PhaseContext:
    """What a phase's `run` gets: its folder, its deadline, and `command()` to start processes under it."""

    name: str
    out_dir: Path
    deadline: float  # time.monotonic() by which the phase must be done
    env: dict
    commands: list[Command] = field(default_factory=list)
    on_change: Callable[[], None] = lambda: None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, argv: list[str], log_name: str, timeout: float | None = None, cwd=None) -> Command:
        """Run `argv` (output to logs/LOG_NAME.log) until it ends or the phase's time is up;
        a process that runs out of time is stopped with its children (its own process group)."""
        log = self.out_dir / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        limit = self.left() if timeout is None else min(timeout, self.left())
        done = Command([str(a) for a in argv], str(log.relative_to(self.out_dir)))
        self.commands.append(done)
        if limit <= 0:
            done.timed_out = True
            self.on_change()
            return done
        start = time.monotonic()
        with open(log, "w") as stream:
            process = subprocess.Popen(
                done.argv, stdout=stream, stderr=subprocess.STDOUT, env=self.env, cwd=cwd, start_new_session=True
            )
            try:
                done.returncode = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                done.timed_out = True
                stop_group(process)
                done.returncode = process.returncode
                stream.write(f"\n[stopped: the time box of {limit:.0f} s ran out]\n")
            except BaseException:  # the orchestrator itself is stopped: take the children with it
                stop_group(process)
                raise
        done.seconds = time.monotonic() - start
        self.on_change()
        return done


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def allowance(phases: list[Phase], index: int, left: float) -> float:
    """The seconds phase `index` may take when `left` remain: its box, less what the later
    phases reserve."""
    reserved = sum(phase.reserve_s for phase in phases[index + 1 :])
    return min(phases[index].box_s, left - reserved)


def run_phases(
    phases: list[Phase],
    out_dir,
    budget_s: float,
    env: dict | None = None,
    header: dict | None = None,
    on_save: Callable[[dict], None] | None = None,
) -> dict:
    """Run `phases` in order within `budget_s` seconds; the record (also in OUT/phases.json,
    rewritten at every change, when `on_save(record)` is called too)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + budget_s
    record = {
        **(header or {}),
        "budget_s": budget_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "phases": {p.name: {"status": "pending", "what": p.what, "box_s": p.box_s} for p in phases},
    }

    def save():
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        atomic_write_text(out_dir / RECORD, json.dumps(record, indent=2, default=str))
        if on_save:
            on_save(record)

    save()
    for index, phase in enumerate(phases):
        entry = record["phases"][phase.name]
        seconds = allowance(phases, index, deadline - time.monotonic())
        if seconds < max(min(phase.reserve_s, phase.box_s), 1.0):
            entry.update(status="skipped", reason=f"not enough time left ({max(seconds, 0):.0f} s)")
            save()
            continue
        context = PhaseContext(phase.name, out_dir, time.monotonic() + seconds, env or dict(os.environ))
        entry.update(status="running", allowed_s=round(seconds, 1))

        def on_change(entry=entry, context=context):
            entry["commands"] = [c.as_dict() for c in context.commands]
            save()

        context.on_change = on_change
        save()
        start = time.monotonic()
        try:
            result = phase.run(context) or {}
            timed_out = any(c.timed_out for c in context.commands)
            failed = [c for c in context.commands if c.returncode not in (0, None) and not c.timed_out]
            status = result.pop("status", None) or ("timed out" if timed_out else "failed" if failed else "ok")
            entry.update(status=status, **result)
        except Exception as error:  # a phase that breaks is recorded; the next ones still run
            entry.update(status="error", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.monotonic() - start, 1)
        on_change()
        print(f"gpu-check: {phase.name}: {entry['status']} ({entry['seconds']:.0f} s)", file=sys.stderr, flush=True)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()
    return record
