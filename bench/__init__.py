"""The benchmark: `python -m bench` (or `make bench`). See BENCHMARKS.md."""
