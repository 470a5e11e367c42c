"""Client-side defenses (DP-SGD via Opacus, gradient pruning, noise, sketch+noise) and DP accounting.

Empty so far: the defenses arrive with their own issue. Until then a scenario's ``defense``
section accepts only ``none`` (fedsim/scenario.py rejects anything else with exit code 2).
"""
