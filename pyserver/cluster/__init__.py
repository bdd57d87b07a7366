"""Cells of several app servers on ZooKeeper (DESIGN.md "Ownership and fencing").

One module per job: `zk` (the process's ZooKeeper session), `membership` (an
app server's ephemeral registration in its cell), `ringwatch` (a cell's ring,
rebuilt from ZooKeeper on every change: app servers and discovery use it),
`fence` (`OwnershipFence`: may this node serve this user now?), `freeze` (users
frozen in a cell while they move to another), `routing` (requests sent to a
user's owner, following NOT_OWNER), `layout` (the ZooKeeper paths and
records), `state` (a cluster's state in one place: the launched cluster's
`cluster.json`, the cells' records, the flags every command names a cluster
with) and `tools` (`pyserver admin drain` and `nodes`).
The processes that use them are in `pyserver.processes`. docs/cluster.md
describes how they fit together.

May import: pyserver.errors, pyserver.addresses, pyserver.config, pyserver.ring,
pyserver.wire, pyserver.client, pyserver.servicelink, pyserver.servicekey.
"""
