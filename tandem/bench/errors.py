"""Errors of ``tandem bench``.

BenchError
├── WorkloadDataError   the public data a workload reads is missing or malformed
├── BenchConfigError    options that cannot work together (a person must change them)
└── MeshStartError      the bench could not start its own edge, NATS or cloud worker
"""

from __future__ import annotations


class BenchError(Exception):
    """Base class of the benchmark's errors."""


class WorkloadDataError(BenchError):
    """A workload's data files are missing or not what the loader expects."""


class BenchConfigError(BenchError):
    """The options given to the benchmark contradict each other or are out of range."""


class MeshStartError(BenchError):
    """A process of the bench's own mesh exited or did not become ready."""
