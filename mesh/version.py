"""Tandem's version (read from the installed distribution), reported in heartbeats."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tandem-mesh")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
