"""The MTA proxy: SMTP in, lightweight email objects out to each recipient's owner.

`smtpd` is the MTA port's SMTP protocol and `smtp` its listeners (aiosmtpd for the
submission port), `intake` what happens to a recipient and a
message, `parse` reads MIME with the standard library's `email` package (with
`skeleton` setting big base64 bodies aside and `htmltext` for HTML-only mail),
`emailobject` builds what DELIVER carries, `route` reaches a user's owner,
`service` assembles them (`pyserver.processes.mta` runs it alone: `pyserver
mta`). Calls the blob store, the address book (the store's addresses table) and
app servers through the client library; nothing calls it.

May import: pyserver.errors, pyserver.wire, pyserver.client, pyserver.store,
pyserver.blobs, pyserver.servicelink, pyserver.addresses, pyserver.servicekey.
"""
