"""The binary wire protocol of DESIGN.md: frame layout and codec (sans I/O)."""
