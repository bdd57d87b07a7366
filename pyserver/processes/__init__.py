"""The processes: each serving `pyserver` command assembled from one `Config`, and its life.

`assembly` builds what every app server has (`AppServerParts`) and puts any
service on the wire shell (`service_server`); `cell` is `pyserver run` (a whole
single-node cell), `node` is `pyserver node` (one app server of a cell on
ZooKeeper); `userindex`, `dirty`, `discovery` and `mta` run those services on
their own; `launcher` is `pyserver cluster up|status|down`; `runtime` is what
they share (logging, the event loop, signals, the ready file). Nothing below
imports this package.

May import: any of pyserver but pyserver.cli and pyserver.admin.
"""
