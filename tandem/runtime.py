"""Moved to ``mesh.runtime`` (roles must not import the composition root).

Kept only while ``bench/scale_bench.py`` still imports it from here; delete it once
that import reads ``from mesh.runtime import freeze_startup_objects``.
"""

from mesh.runtime import freeze_startup_objects

__all__ = ["freeze_startup_objects"]
