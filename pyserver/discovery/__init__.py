"""Discovery: which cell a user lives in, and which app server of that cell owns the user.

* `directory`: the durable user -> cell directory in the store's `directory`
  table, with a first-writer-wins placement of new users.
* `service`: the discovery service (LOOKUP, CELL_RING, CELLS) and its cells'
  ring clients (`pyserver.processes.discovery` runs it: `pyserver discovery`).
* `client`: `ClusterClient`, the client library that routes through discovery.
* `move`: `pyserver admin move-user`.
* `evacuate`: every user of a cell moved to other cells, in parallel and throttled.
* `cellcommand`: `pyserver cell enable|disable|show|evacuate`.

docs/cluster.md ("Discovery and several cells") describes the whole. A launched
cluster's state (its folder's `cluster.json`, the cells' records in ZooKeeper) is
read and changed through `pyserver.cluster.state`, never through the launcher in
`pyserver.processes`, which sits above discovery.

May import: pyserver.errors, pyserver.userid, pyserver.addresses, pyserver.ring,
pyserver.logcodec, pyserver.snapcache, pyserver.wire, pyserver.client, pyserver.store,
pyserver.config, pyserver.cluster, pyserver.servicelink, pyserver.servicekey, pyserver.tls.
"""
