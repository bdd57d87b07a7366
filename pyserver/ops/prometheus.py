"""A cluster's scrape targets for a Prometheus server, as a `file_sd_configs` file.

`deploy/prometheus.yml` scrapes every target listed in `pyserver-targets.json`
beside it; `pyserver cells --prometheus-targets FILE` writes that file from a
survey (`pyserver.ops.survey.find_targets`): one group per process, labelled
with its role, cell and node, so the Grafana dashboard
(`deploy/grafana-dashboard.json`) can sum and split by them. The file is
replaced atomically; Prometheus re-reads it by itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyserver.ops.survey import Target

__all__ = ["target_groups", "write_targets"]


def target_groups(targets: Iterable[Target], *, tls: bool = False) -> list[dict[str, Any]]:
    """One file_sd group per target with a `/metrics` address."""
    groups = []
    for target in targets:
        if not target.metrics:
            continue
        labels = {"role": target.role, "instance_name": target.name}
        if target.cell:
            labels["cell"] = target.cell
        if target.role == "node":
            labels["node"] = target.name
        if tls:
            labels["__scheme__"] = "https"
        groups.append({"targets": [target.metrics], "labels": labels})
    return groups


def write_targets(path: Path, groups: list[dict[str, Any]]) -> None:
    """Replace `path` with the groups (a reader never sees half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(temporary, path)
