"""The blob store (the Haystack role): attachments, big bodies and raw messages by SHA-256.

Owns blob bytes at rest: `base` is the interface (content addressing, chunk
checksums, streaming), `disk` the embedded engine under the cell's data folder,
`hbase` the HBase engine (`blobs` table, chunked rows), `access` the rule of
who may read a blob (a user with a message that references it), `gc` the garbage
collection of blobs no message references. Calls nothing
above it.

May import: pyserver.errors, pyserver.store, pyserver.client, pyserver.endpoints,
pyserver.servicekey.
"""

from pathlib import Path
from typing import Any

from pyserver.blobs.base import (
    CHUNK_SIZE,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    check_ref,
    is_ref,
)
from pyserver.blobs.disk import DiskBlobStore
from pyserver.store.spec import parse_store_spec

# The embedded blob store's folder, under the cell's data folder.
BLOB_FOLDER = "blobs"


def blob_store_for(config: Any) -> BlobStore:
    """The blob store a process uses (not opened): that of `blob_store` if set, else of
    `store`: with HBase, its `blobs` table; else files under data_dir/blobs."""
    store = getattr(config, "blob_store", "") or getattr(config, "store", "")
    if store.startswith("hbase:"):
        from pyserver.blobs.hbase import HBaseBlobStore  # the HBase libraries load slowly

        spec = parse_store_spec(store, Path(config.data_dir))
        return HBaseBlobStore(spec.host, spec.port, namespace=spec.namespace)
    return DiskBlobStore(Path(config.data_dir) / BLOB_FOLDER)


__all__ = [
    "BLOB_FOLDER",
    "CHUNK_SIZE",
    "BlobCorrupt",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "DiskBlobStore",
    "blob_store_for",
    "check_ref",
    "is_ref",
]
