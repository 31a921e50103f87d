"""Data: the Wikipedia corpus and its windows, and per-head KV traces."""
