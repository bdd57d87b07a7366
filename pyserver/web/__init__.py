"""The web tier: the inbox and web chat a person uses in a browser (docs/web.md).

`server` serves the pages and the live socket on aiohttp; `sessions` signs people
in (session cookies, CSRF tokens); `viewer` scopes every app-server request to the
signed-in user; `live` fans each user's mailbox events out to their open pages;
`counts` reads unread counts through memcached; `ops` is the operators' page
(`/ops`, a survey of the cluster given by the process that builds the tier).

May import: pyserver.errors, pyserver.addresses, pyserver.dirty, pyserver.app,
pyserver.client, pyserver.blobs, pyserver.userid, pyserver.wire, pyserver.servicekey,
pyserver.slowclients, pyserver.metrics, pyserver.observe.
"""
