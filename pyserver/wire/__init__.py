"""The binary wire protocol of DESIGN.md: frame layout and codec (sans I/O).

May import: pyserver.implementation, pyserver.pure, pyserver.framedef, pyserver.errors.
"""
