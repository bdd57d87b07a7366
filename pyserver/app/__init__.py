"""The application server: owns users' images and their writes; calls store, cache, user index.

`image.UserImage` is one user's whole recent mailbox, changed only by applying log
entries; `mailbox.Mailbox` is the business logic of every per-user operation of
docs/protocol.md, writing through the store and keeping images in the snapshot cache.

May import: pyserver.errors, pyserver.userid, pyserver.framedef,
pyserver.implementation, pyserver.logcodec, pyserver.snapcache, pyserver.wire,
pyserver.store, pyserver.blobs, pyserver.userindex, pyserver.servicekey.
"""
