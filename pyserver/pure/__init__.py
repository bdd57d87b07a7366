"""Pure-Python twins of the native core: same API, same bytes out, no compiled code.

Used when the native modules are absent or when `PYSERVER_PURE=1` is set; always
importable, so tests and benchmarks can run both side by side.

May import: pyserver.errors, pyserver.userid, pyserver.framedef.
"""
