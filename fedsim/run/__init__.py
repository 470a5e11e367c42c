"""A run: the Flower apps (``apps``), the round loop (``rounds``) and its observers (``observers``: results,
progress, failures), results files (``results``, ``outdir``), checkpoints and resuming (``checkpoint``,
``resume``), traffic metering (``metered``) and the progress bar (``progress``)."""
