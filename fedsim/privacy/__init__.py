"""Empirical privacy: measured, not accounted. ``canaries`` is the one-shot canary estimator of
Andrew et al. (ICLR 2024) and ``one_run`` the epsilon lower bound of Steinke, Nasr, Jagielski's audit in one
training run (NeurIPS 2023), both pure numpy/scipy (no Flower, no other fedsim module); ``run`` puts the
canaries in a fedsim run."""
