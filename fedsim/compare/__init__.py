"""Comparing runs: grids of scenarios (``sweep``), their ``runs.csv`` (``runs_csv``) and the HTML report of a
run or a sweep (``report``)."""
