"""Benchmarks: ``python -m bench.<name>`` from the repository root.

They import the product (``tandem.local`` starts their processes), never the tests.
"""
