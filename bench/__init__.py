"""Benchmarks against the reference path, and the reference path itself (reference_path.py, also the oracle of the
drop-in tests). A package imported from the repository root: run a script as `python -m bench.<name>` there, and
tests import `bench.reference_path` (`python -m pytest` puts the root on sys.path)."""
