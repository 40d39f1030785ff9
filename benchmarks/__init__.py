"""fastpeft's benchmark suite (`make bench`, `python -m benchmarks --help`); plots: `python -m benchmarks.plot`."""
