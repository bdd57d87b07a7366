"""Cells of several app servers on ZooKeeper (DESIGN.md "Ownership and fencing").

One module per job: `zk` (the process's ZooKeeper session), `membership` (an
app server's ephemeral registration in its cell), `ringwatch` (a cell's ring,
rebuilt from ZooKeeper on every change: app servers and discovery use it),
`fence` (`OwnershipFence`: may this node serve this user now?), `routing`
(requests sent to a user's owner, following NOT_OWNER), `node` (one app server
of a cell in its own process: `pyserver node`) and `tools` (`pyserver admin
drain` and `nodes`). docs/cluster.md describes how they fit together.
"""
