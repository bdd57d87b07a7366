"""`python -m bench.mail_cpu [MAILS] [ROUNDS] [BODY_BYTES] [--mta-process]`: CPU per mail
of the receiving process, the MTA proxy beside a bare aiosmtpd sink, both fed by
Postfix's smtp-source (32 sessions, 300-byte body) in alternating rounds on a fresh
`pyserver run` cell.

With `--mta-process` the proxy fed is `pyserver mta` in a process of its own in front of
the cell (`mta_process_*`), and the cell's CPU per mail (its app server's work) is given
beside it (`cell_cpu_ms`).

With BODY_BYTES (e.g. 1048576, the 1 MiB mail of `bench mail`) the bodies are that big and
the proxy's neighbour is Postfix's smtp-sink (the bare aiosmtpd sink takes 1 MiB bodies
slower than the proxy does); its CPU per mail is measured the same way.

Rates on a shared, loaded machine swing with the load; the CPU a receiver spends per mail
(its /proc utime + stime over a round) is steadier, and says how much of the sink's
budget the proxy's own work takes. Prints one JSON line per round.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

from bench.mail import _aiosmtpd_sink, _cell, _mta_process, _smtp_sink, _source


def _cpu_s(pid: int) -> tuple[float, float]:
    """(user + system, system) seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def _listener(port: int) -> int:
    """The pid of the process listening on a loopback port."""
    shown = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    return int(shown.split("pid=")[1].split(",")[0])


def main(mails: int = 2000, rounds: int = 2, size: int = 300, mta_process: bool = False) -> None:
    big = size > 64 << 10
    sink_name = "smtp_sink" if big else "aiosmtpd_sink"
    sink = _smtp_sink() if big else _aiosmtpd_sink()
    with contextlib.ExitStack() as stack:
        data, _, smtp_port, _ = stack.enter_context(_cell())
        sink_port = stack.enter_context(sink)
        cell_pid = _listener(smtp_port)
        fed = "pyserver"
        if mta_process:
            fed, smtp_port = "mta_process", stack.enter_context(_mta_process(data))
        _source(smtp_port, 100 if not big else 10, size)  # warm up
        receivers = {fed: smtp_port, sink_name: sink_port}
        pids = {name: _listener(port) for name, port in receivers.items()}
        for _ in range(rounds):
            line = {}
            for receiver, port in receivers.items():
                before, cell_before = _cpu_s(pids[receiver]), _cpu_s(cell_pid)
                seconds = _source(port, mails, size)
                after, cell_after = _cpu_s(pids[receiver]), _cpu_s(cell_pid)
                line[f"{receiver}_per_s"] = round(mails / seconds, 1)
                line[f"{receiver}_cpu_ms"] = round((after[0] - before[0]) / mails * 1e3, 2)
                line[f"{receiver}_sys_ms"] = round((after[1] - before[1]) / mails * 1e3, 2)
                if receiver == "mta_process":
                    used = cell_after[0] - cell_before[0]
                    line["cell_cpu_ms"] = round(used / mails * 1e3, 2)
            line["rate_ratio"] = round(line[f"{fed}_per_s"] / line[f"{sink_name}_per_s"], 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    numbers = [int(arg) for arg in sys.argv[1:] if arg != "--mta-process"]
    main(*numbers[:3], mta_process="--mta-process" in sys.argv[1:])
