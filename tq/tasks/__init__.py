"""Evaluation tasks and their records, metrics and statistics."""
