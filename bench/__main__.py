"""`python -m bench SUITE [--json] [--quick]`: pyserver against its pure twins and its peers.

`micro`: the native core parts against their pure twins and peer libraries.
`server`: a running app server under load, native+uvloop against pure+asyncio, and Redis.
`mail`: SMTP end to end against DELIVER. `userindex`: relation queries.
`cluster`: a 3-node HBase cell against one SQLite node; failover and join times.
`web`: live chat through the web tier with 1,000 pages connected, against direct SENDs.
`sms`: texts in and out through the SMS gateway against a simulated SMSC.
`ops`: a cell of 10,000 users evacuated (issue 13).
`import`: history imported into a single node, alone and beside live load; `corpus`
writes the mailboxes it imports (`python -m bench corpus --help`).
`history`: a user's past rebuilt from the log (show, history, restore) against reading it.
`chaos`: faults under load for --minutes (seed --seed), then a Jepsen-style checker.
`blobgc`: blob garbage collection of a cell against the listing and reading it cannot skip.
Each prints one JSON object with --json. Every figure of a run is measured in that run.
The benchmarks refuse to run on the pure fallback: a missing native module is an error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from collections.abc import Callable

MICRO_PARTS = ("micro_ring", "micro_logcodec", "micro_snapcache", "micro_frame", "micro_replies")


def _require_native() -> None:
    from pyserver import doctor

    report = doctor.report()
    pure = [part for part, impl in report.items() if impl == "pure"]
    if pure or not report["native_release_build"]:
        sys.exit(
            f"bench: refusing to run on the pure fallback or a debug build: {report}. "
            "Run scripts/setup (and unset PYSERVER_PURE)."
        )


def _micro(quick: bool) -> dict[str, object]:
    results: dict[str, object] = {}
    for name in MICRO_PARTS:
        module = importlib.import_module(f"bench.{name}")
        results.update(module.run(quick=quick))
    return results


def _print_table(results: dict[str, object]) -> None:
    print(f"{'benchmark':<20}{'native ns':>11}{'pure ns':>11}{'speedup':>9}   peers (ns/op)")
    for key, figures in results.items():
        if not isinstance(figures, dict) or "native_ns" not in figures:
            continue
        peers = ", ".join(f"{name} {ns:g}" for name, ns in figures["peers"].items())
        print(
            f"{key:<20}{figures['native_ns']:>11g}{figures['pure_ns']:>11g}"
            f"{figures['speedup']:>8g}x   {peers}"
        )
        extra = {
            k: v
            for k, v in figures.items()
            if k not in ("native_ns", "pure_ns", "speedup", "peers")
        }
        if extra:
            print(f"{'':<20}{extra}")


# Each suite but `micro` is a module of bench/ with `run(quick) -> dict`.
SUITE_MODULES = ("server", "writes", "mail", "userindex", "cluster", "web", "sms", "imap", "import")
SUITE_MODULES += ("history",)
SUITE_MODULES += ("chaos",)
SUITE_MODULES += ("blobgc",)
SUITE_MODULES += ("ops",)
# Suites whose module is named otherwise (`import` is a Python keyword).
MODULE_OF = {"import": "importer"}


def _suite(name: str, tls: bool = False, **chaos: object) -> Callable[[bool], dict[str, object]]:
    if name == "micro":
        return _micro
    module = importlib.import_module(f"bench.{MODULE_OF.get(name, name)}")
    if tls:  # only the suites that can run over TLS take it
        return lambda quick: module.run(quick=quick, tls=True)
    if name == "chaos":
        return lambda quick: module.run(quick=quick, **chaos)
    return lambda quick: module.run(quick=quick)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["corpus"]:  # a generator, not a measurement
        from bench import corpus

        return corpus.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=("micro", *SUITE_MODULES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a short smoke run, not for figures")
    parser.add_argument(
        "--tls", action="store_true", help="server: the cost of TLS (plain and mutual TLS)"
    )
    parser.add_argument("--minutes", type=float, help="chaos: how long the faults run")
    parser.add_argument("--seed", type=int, help="chaos: the seed of the faults and the load")
    args = parser.parse_args(argv)
    if args.tls and args.suite != "server":
        parser.error("--tls goes with the server suite")
    if (args.minutes is not None or args.seed is not None) and args.suite != "chaos":
        parser.error("--minutes and --seed go with the chaos suite")

    _require_native()
    started = time.perf_counter()
    chaos = {"minutes": args.minutes, "seed": args.seed} if args.suite == "chaos" else {}
    results = _suite(args.suite, args.tls, **chaos)(args.quick)
    results["meta"] = {
        "suite": args.suite + (" --tls" if args.tls else ""),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(results))
    elif args.suite == "micro":
        _print_table(results)
        print(f"({results['meta']['seconds']} s)")
    else:
        for scenario in results.pop("scenarios", []):
            print(scenario)
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
