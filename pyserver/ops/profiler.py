"""`pyserver profile NODE --seconds N`: where a running server's time goes.

Samples the process's Python stacks with py-spy (a sampling profiler that reads
the process's memory from outside: the server runs on, unpaused with
`--nonblocking`, and needs no code of its own for it), `--rate` times a second
for `--seconds`, then prints:

* how many stacks were sampled, and `busy_threads`: on average how many of the
  process's threads py-spy found running at a sample (it skips threads it judges
  idle; a thread blocked in native code, such as the event loop's poll, may
  still count; the store's writer thread adds its own);
* the functions the time is spent **in** (the innermost frame, "own"), and the
  functions it is spent **under** (anywhere on the stack, "total"), each with
  its share of the busy samples.

NODE is a process of a `pyserver cluster up` folder (`--cluster DIR`: a node id
such as `cell-1-n2`, or any process name there: `discovery-1`, `mta`), or a
pid. `--json` prints one object. This module reads the cluster's state through
`pyserver.cluster.state` and imports nothing else of pyserver.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess  # nosec B404
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyserver.cluster.state import NoCluster, add_cluster_folder_argument, read_state

__all__ = ["Profile", "ProfileError", "add_parser", "parse_collapsed", "sample"]


class ProfileError(Exception):
    """The process could not be sampled; the message says why."""


@dataclass
class Profile:
    """Samples of one process: by innermost function ("own") and by any frame ("total")."""

    pid: int
    seconds: float
    rate: int
    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)

    @property
    def busy_threads(self) -> float:
        """Threads found running at a sample, on average (stacks over samples asked)."""
        asked = self.seconds * self.rate
        return self.samples / asked if asked else 0.0

    def top(self, counter: Counter[str], limit: int) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "share": round(n / self.samples, 4)}
            for name, n in counter.most_common(limit)
        ]

    def report(self, limit: int = 15) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "seconds": self.seconds,
            "rate": self.rate,
            "samples": self.samples,
            "busy_threads": round(self.busy_threads, 3),
            "own": self.top(self.own, limit),
            "total": self.top(self.total, limit),
        }


def parse_collapsed(text: str, profile: Profile) -> Profile:
    """Add py-spy's raw (collapsed) stacks, `outer;...;inner COUNT` a line, to `profile`."""
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        profile.samples += n
        profile.own[frames[-1]] += n
        for frame in set(frames):
            profile.total[frame] += n
    return profile


def sample(pid: int, seconds: float, rate: int = 100) -> Profile:
    """Sample the process `seconds` long (module docstring); ProfileError if py-spy cannot."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise ProfileError("py-spy is not installed (pip install py-spy; it is in pyproject)")
    with tempfile.TemporaryDirectory(prefix="pyserver-profile-") as tmp:
        out = Path(tmp) / "stacks.txt"
        done = subprocess.run(  # nosec B603 (py-spy on a pid, no shell)
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
             "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
             "--output", str(out)],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        if done.returncode != 0 or not out.exists():
            reason = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ProfileError(f"py-spy could not sample pid {pid}: {' '.join(reason)}")
        return parse_collapsed(out.read_text(errors="replace"), Profile(pid, seconds, rate))


def _pid_of(target: str, cluster: Path | None) -> int:
    if target.isdigit():
        return int(target)
    if cluster is None:
        raise ProfileError(f"{target}: name a process with --cluster DIR, or give its pid")
    processes = read_state(cluster)["processes"]
    for process in processes:
        if target in (process["name"], process.get("node")):
            return int(process["pid"])
    names = ", ".join(p["name"] for p in processes)
    raise ProfileError(f"no process {target} in {cluster} (it has {names})")


def _print(report: dict[str, Any], name: str) -> None:
    print(
        f"{name} (pid {report['pid']}): {report['samples']} samples in {report['seconds']:g} s "
        f"at {report['rate']}/s; {report['busy_threads']:.2f} threads running on average"
    )
    for title, key in (("time spent in (own)", "own"), ("time spent under (total)", "total")):
        print(f"\n{title}:")
        for row in report[key]:
            print(f"  {row['share']:>6.1%} {row['samples']:>7}  {row['function']}")


def _profile_command(args: argparse.Namespace) -> int:
    try:
        pid = _pid_of(args.node, args.cluster)
        report = sample(pid, args.seconds, args.rate).report(args.top)
    except (ProfileError, NoCluster) as error:
        print(f"pyserver profile: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        _print(report, args.node)
    return 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `profile` to the `pyserver` command line."""
    profile = commands.add_parser("profile", help="sample a running server: where its time goes")
    profile.add_argument("node", help="a process of --cluster DIR (cell-1-n2, mta...), or a pid")
    add_cluster_folder_argument(profile)
    profile.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    profile.add_argument("--rate", type=int, default=100, help="samples a second (default 100)")
    profile.add_argument("--top", type=int, default=15, help="functions listed (default 15)")
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(handler=_profile_command)
    return profile
