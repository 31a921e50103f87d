"""Quantizers on arrays: TurboQuant MSE and Prod, packed batches, the uniform and FP8 baselines."""
