"""Benchmarks for TrustChain. Run them by hand; they are never tests.

``python -m bench.stoq`` compares the STOQ server (a real ``trustchain serve``)
with a bare QUIC echo server on the same engine; see ``bench/README.md``.
"""
