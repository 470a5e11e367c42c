"""Empirical privacy: measured, not accounted. ``canaries`` is the one-shot canary estimator of
Andrew et al. (ICLR 2024), pure numpy/scipy (no Flower, no other fedsim module)."""
