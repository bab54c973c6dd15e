"""Side-by-side measurements, run by `make bench`; never part of the pass/fail test suite."""
