"""The `pyserver` command (and `python -m pyserver`): `pyserver import ...` goes straight
to the importer, without loading every other command (scripts start imports often, and
loading them all cost about a second a start); everything else to `pyserver.cli`.

May import: pyserver.cli, pyserver.importer.command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["import"]:
        from pyserver.importer.command import main as import_main

        return import_main(args)
    from pyserver.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
