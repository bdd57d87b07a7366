"""pyserver benchmarks: `python -m bench micro [--json]`."""
