"""`pyserver import`: existing history (mbox, Maildir, a tree of them, JSON lines) into a cell.

Sources turn files into normalised records, one mailbox (user) at a time
(`mbox`, `maildir`, `tree`, `jsonl`, with `mail` reading each mail as the MTA
proxy does, blobs included); `writer` appends each user's new records to that
user's log as one compare-and-set batch, threads rebuilt and duplicates
skipped; `checkpoint` remembers the users done so an interrupted import
resumes; `report` counts what happened; `run` plans the units of work and runs
them, many users at once; `command` is the command line. docs/import.md tells
how to use it.

May import: any of pyserver but pyserver.cli, pyserver.admin.
"""
