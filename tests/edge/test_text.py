"""Stop sequences and UTF-8 reassembly across token boundaries."""

from edge.text import StopMatcher, TextAssembler


def test_stop_sequence_spanning_pushes_is_cut_and_never_emitted() -> None:
    m = StopMatcher(["END"])
    out = m.push("hello E") + m.push("N") + m.push("D tail")
    assert out == "hello "
    assert m.stopped
    assert m.flush() == ""


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    m = StopMatcher(["END"])
    assert m.push("abc EN") == "abc "
    assert m.push("X") == "ENX"
    assert not m.stopped


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo"])
    assert m.push("hello world") == "hel"


def test_multibyte_character_split_across_tokens() -> None:
    a = TextAssembler([])
    raw = "é🙂".encode()
    pieces = [a.push(raw[i : i + 1]) for i in range(len(raw))]
    assert "".join(pieces) + a.finish() == "é🙂"
    assert pieces[0] == ""  # half a character is held back, not mangled


def test_finish_releases_held_tail() -> None:
    a = TextAssembler(["STOP"])
    assert a.push(b"go ST") == "go "
    assert a.finish() == "ST"


def test_long_token_pieces_survive_decoding() -> None:
    """llama-cpp-python's detokenize drops pieces over 32 bytes; the engine's reader must not."""
    from llama_cpp import Llama

    from models.bundled import locate_bundled_gguf
    from models.vocab import llama_token_bytes

    llama = Llama(str(locate_bundled_gguf()), vocab_only=True, verbose=False)
    spaces = "\n" + " " * 32
    (token,) = llama.tokenize(spaces.encode(), add_bos=False, special=True)
    assert llama_token_bytes(llama)(token) == spaces.encode()
    a = TextAssembler([])
    assert a.push(llama_token_bytes(llama)(token)) + a.finish() == spaces
