"""Subject names and tokens."""

from __future__ import annotations

import re

import pytest

from mesh import subjects

SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_subjects_have_the_documented_shape() -> None:
    assert subjects.node_load("edge-1") == "tandem.v1.nodes.edge-1.load"
    assert subjects.all_node_loads() == "tandem.v1.nodes.*.load"
    assert subjects.cloud_generate("smol") == "tandem.v1.cloud.smol.generate"
    assert subjects.cloud_verify("smol") == "tandem.v1.cloud.smol.verify"
    assert subjects.cloud_cancel("smol", "edge-1") == "tandem.v1.cloud.smol.cancel.edge-1"
    assert subjects.cloud_cancels(model="smol") == "tandem.v1.cloud.smol.cancel.*"
    assert subjects.cloud_cancels(node_id="edge-1") == "tandem.v1.cloud.*.cancel.edge-1"
    assert subjects.cancel_sender(subjects.cloud_cancel("a.b/c", "edge-1")) == "edge-1"
    assert subjects.inbox_owner("_INBOX.edge-1.abc.def") == "edge-1"
    assert subjects.inbox_owner("tandem.v1.nodes.x.load") is None
    assert subjects.worker("w1", "generate") == "tandem.v1.worker.w1.generate"
    assert subjects.liveness("_INBOX.abc123") == "_INBOX.abc123.alive"
    assert subjects.POLICY_BUCKET == "tandem_policy"


def test_safe_tokens_are_unchanged() -> None:
    assert subjects.token("SmolLM2-135M_instruct") == "SmolLM2-135M_instruct"


def test_model_names_with_slashes_and_dots_become_one_safe_token() -> None:
    model = "HuggingFaceTB/SmolLM2-1.7B"
    tok = subjects.token(model)
    assert SAFE.fullmatch(tok)
    assert tok.startswith("HuggingFaceTB_SmolLM2-1_7B_")
    assert subjects.token(model) == tok
    assert subjects.cloud_generate(model) == f"tandem.v1.cloud.{tok}.generate"


def test_different_unsafe_names_get_different_tokens() -> None:
    assert subjects.token("a.b") != subjects.token("a/b")
    assert subjects.token("a.b") != "a_b"


def test_wildcards_cannot_leak_into_subjects() -> None:
    for hostile in ("*", ">", "a.>", "x y"):
        assert SAFE.fullmatch(subjects.token(hostile))


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError):
        subjects.token("")
    assert subjects.token("0") == "0"


def test_service_name_is_a_valid_micro_name() -> None:
    name = subjects.cloud_service_name("HuggingFaceTB/SmolLM2-135M")
    assert SAFE.fullmatch(name)
    assert name.startswith("tandem-cloud-")


def test_liveness_refuses_wildcards_and_empty_tokens() -> None:
    for bad in ("_INBOX.*", "_INBOX.>", "a..b", "", "has space"):
        with pytest.raises(ValueError):
            subjects.liveness(bad)
    assert subjects.liveness("a.b") == "a.b.alive"
