"""pyserver's wire-frame codec in Cython; see `pyserver.wire.frame` for the facade.

The pure-Python twin with the same API is `pyserver.pure.frame`.
"""

from pyserver_framecodec._codec import FrameDecoder, encode_frame

__all__ = ["FrameDecoder", "encode_frame"]
