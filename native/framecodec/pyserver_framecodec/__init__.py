"""pyserver's wire-frame codec in Cython; see `pyserver.wire.frame` for the facade.

The pure-Python twin with the same API is `pyserver.pure.frame`.
"""

from pyserver_framecodec._codec import FrameDecoder, encode_frame
from pyserver_framecodec._replies import ReplyTable

__all__ = ["FrameDecoder", "ReplyTable", "encode_frame"]
