"""What every serving process gets from `pyserver.processes.runtime.run`."""

from __future__ import annotations

import json
import subprocess
import sys

from pyserver.processes.runtime import SERVER_GC_THRESHOLDS


def test_a_serving_process_runs_with_the_collector_tuned_for_servers() -> None:
    # In a process of its own: the thresholds are the whole process's.
    program = (
        "import gc, json\n"
        "from pyserver.processes.runtime import run\n"
        "async def main():\n"
        "    return {'threshold': gc.get_threshold(), 'frozen': gc.get_freeze_count()}\n"
        "print(json.dumps({'before': gc.get_threshold(), **run(main())}))\n"
    )
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                           check=True, timeout=60)  # fmt: skip
    seen = json.loads(shown.stdout)
    assert seen["before"] != list(SERVER_GC_THRESHOLDS)
    assert seen["threshold"] == list(SERVER_GC_THRESHOLDS)
    assert seen["frozen"] > 1000  # the modules loaded before serving are out of its sight
