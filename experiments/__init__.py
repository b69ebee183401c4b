"""absl entry points over the `afl` library: run, table2, benchmarks."""
