"""The web tier's pieces: what the web gateway calls to serve pages (counts.py: unread counts).

May import: pyserver.errors, pyserver.addresses, pyserver.dirty.
"""
