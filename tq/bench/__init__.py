"""Benchmark workloads; each returns one result record (:mod:`tq.records`)."""
