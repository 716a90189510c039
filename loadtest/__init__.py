"""Fleet simulator, load generator and benchmarks for Ballast."""
