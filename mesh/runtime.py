"""Process plumbing of the long-running daemons on the mesh (edge, cloud worker).

It lives in the library both roles share, so neither imports the composition root.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move everything alive after startup out of the garbage collector's sight.

    A daemon carries hundreds of thousands of objects from startup (modules,
    pydantic schemas, the tokenizer's tables) that live as long as it does. The
    cyclic collector's full passes walk all of them again and again while requests
    allocate; ``gc.freeze()`` (what vLLM's API server does after startup, and
    Instagram's servers before it) takes them out of those passes. Call it once,
    when startup is done.
    """
    gc.collect()
    gc.freeze()
