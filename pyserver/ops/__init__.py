"""Operators' views of a running cluster, from the processes' own Prometheus metrics.

* `figures`: one process's figures from two readings of its `/metrics`.
* `survey`: every cell, app server and service of a cluster, scraped at once.
* `terminal`: `pyserver cells` (live with rich, `--once`, `--json`).
* `prometheus`: the scrape targets of a cluster for a Prometheus server.

The web tier's `/ops` page shows the same survey (`pyserver.processes.web` wires it).

May import: pyserver.errors, pyserver.cluster, pyserver.config, pyserver.tls.
"""
