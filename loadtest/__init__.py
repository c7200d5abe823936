"""Benchmarks and the load generator (``wsfleet loadtest``).

Owns: the tools that measure wsfleet against other servers and its own parts
(``ipc_bench``), and the figures in ``RESULTS.md``.  Never imported by the
server itself.
"""
