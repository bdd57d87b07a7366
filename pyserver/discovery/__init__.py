"""Discovery: which cell a user lives in, and which app server of that cell owns the user.

* `directory`: the durable user -> cell directory in the store's `directory`
  table, with a first-writer-wins placement of new users.
* `freeze`: users frozen in a cell while they move to another (ZooKeeper), and
  the app-server side that refuses their writes.
* `service`: the discovery service (LOOKUP, CELL_RING, CELLS) and its cells'
  ring clients; `command`: `pyserver discovery`.
* `client`: `ClusterClient`, the client library that routes through discovery.
* `move`: `pyserver admin move-user`.

docs/cluster.md ("Discovery and several cells") describes the whole.
"""
