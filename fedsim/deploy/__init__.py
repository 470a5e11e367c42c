"""Deploying fedsim's apps on real SuperLink/SuperNode processes: certificates and node keys
(``certs``), a node's own data from its ``--node-config`` (``node_data``), and the
loopback demo (``demo``)."""
