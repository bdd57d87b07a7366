"""The IMAP gateway: every conversation of a user, in any mail client.

pymap (asyncio, MIT) speaks IMAP4rev1 and its extensions; this package is its
backend: sign-in with a user token (`login`), the user's folders and messages
read from the app servers (`folders`), and each message as RFC 5322 bytes
(`render`), and APPENDed mail kept as the MTA keeps mail (`append`).
`gateway.ImapGateway` listens. docs/imap.md says what maps to what.

May import: pyserver.errors, pyserver.client, pyserver.app, pyserver.servicekey,
pyserver.wire, pyserver.userid, pyserver.blobs, pyserver.mta, pyserver.metrics.
"""
