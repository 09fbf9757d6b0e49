"""Entry encoding and offsets."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from resumable_stream import EventTooLarge, InvalidOffset, Position, parse_offset
from resumable_stream._codec import (
    EventEncoder,
    decode_entry,
    encode_entry,
    format_offset,
    join_entry,
)
from resumable_stream._recent import Recent


def tok(text: str, message_id: str | None = None, node: str | None = None) -> tuple[str, dict]:
    return ("token", {"text": text, "message_id": message_id, "node": node})


def test_round_trip_keeps_every_event_and_its_metadata() -> None:
    items = [
        tok("Hel", "m1", "agent"),
        tok("lo", "m1", "agent"),
        ("tool_start", {"name": "search", "input": {"q": "x"}}),
        tok(" wor", "m2", "agent"),
        tok("ld", "m2", "agent"),
        tok("!", "m2", None),
        ("token", {"text": "ns", "message_id": "m2", "node": "agent", "ns": ["sub:1"]}),
        ("token", {"text": "user-made", "lang": "en", "score": 1}),  # three other keys
        tok("after", "m2", "agent"),
        tok("", None, None),
        ("end", {}),
    ]
    events = decode_entry(encode_entry(items), 17, 4)
    assert [(e.type, e.data) for e in events] == items
    assert [e.offset for e in events] == [format_offset(17, 4, i) for i in range(len(items))]


def test_offsets_of_entries_from_many_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The run part of offsets is kept per epoch (a bounded cache): entries of runs read in
    # turn, past its size, still get their own run's offsets.
    monkeypatch.setattr("resumable_stream._codec._EPOCH_TEXT", Recent(3, 60.0))
    lone = encode_entry([tok("a")])
    several = encode_entry([tok("a"), ("end", {})])
    for epoch in [1, 2, 3, 4, 5, 1, 10**15 + 7, 10**17, 2]:
        for seq in (1, 12, 10**10):
            assert [e.offset for e in decode_entry(lone, epoch, seq)] == [
                format_offset(epoch, seq, 0)
            ]
            assert [e.offset for e in decode_entry(several, epoch, seq)] == [
                format_offset(epoch, seq, 0),
                format_offset(epoch, seq, 1),
            ]


def test_repeated_token_metadata_is_written_once() -> None:
    payload = encode_entry([tok("abcd", "run-0b6f1d2e-9a7c-4b7e-8c43-5d6e7f8a9b0c", "agent")] * 100)
    assert len(payload) < 100 * 8 + 120


def test_non_json_values_are_converted() -> None:
    class Custom:
        def __repr__(self) -> str:
            return "<custom>"

    (event,) = decode_entry(encode_entry([("custom", {"data": {1: Custom(), "s": {2}}})]), 1, 1)
    assert event.data == {"data": {"1": "<custom>", "s": [2]}}


def test_offsets() -> None:
    assert parse_offset(format_offset(1732170000000, 12, 3)) == Position(1732170000000, 12, 3)
    assert format_offset(1732170000123456, 12, 3) == "1732170000123456-0000000012-00003"
    assert parse_offset("5-1-0") < parse_offset("5-1-1") < parse_offset("5-2-0")
    big = 2**64  # past an unsigned 64-bit number, as Redis entry ids are
    assert parse_offset(f"{big - 1}-{big - 1}-{big - 1}") == Position(big - 1, big - 1, big - 1)
    for bad in [
        "",
        "1-2",
        "x-1-1",
        "1-0-1",
        "1-1-1-1",
        "1-1-",
        " 1-1-1",
        "1" * 21 + "-1-1",
        f"1-{big}-0",
        f"{big}-1-0",
        f"1-1-{big}",
    ]:
        with pytest.raises(InvalidOffset):
            parse_offset(bad)


def test_token_texts_that_are_not_strings_round_trip() -> None:
    items = [
        ("token", {"text": 5, "message_id": None, "node": None}),
        ("token", {"text": ["a", "b"], "message_id": None, "node": None}),
    ]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == items


def test_offsets_compare_as_plain_strings_in_stream_order() -> None:
    # Clients (LangGraph SDK, AI SDK) compare ids as strings: "5-10-0" < "5-9-0" was wrong.
    positions = [(5, 9, 0), (5, 9, 10), (5, 10, 0), (5, 10, 2), (5, 100, 0), (6, 1, 0)]
    positions += [(1732170000123456, 1, 0), (1732170000123457, 1, 0)]
    offsets = [format_offset(*p) for p in positions]
    assert sorted(offsets) == offsets
    assert sorted(offsets, key=parse_offset) == offsets


def test_unpadded_offsets_issued_before_stay_readable() -> None:
    assert parse_offset("1732170000123456-42-7") == Position(1732170000123456, 42, 7)
    assert parse_offset("1732170000123456-42-7") == parse_offset(
        format_offset(1732170000123456, 42, 7)
    )


def test_token_metadata_does_not_drift_past_a_non_string_token() -> None:
    # Regression (issue 9): the encoder remembered metadata only for string texts, the
    # decoder for any token, so "b" came back attributed to m2.
    items = [
        ("token", {"text": "a", "message_id": "m1", "node": "n"}),
        ("token", {"text": 5, "message_id": "m2", "node": "n"}),
        ("token", {"text": "b", "message_id": "m1", "node": "n"}),
    ]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == items


def test_events_encoded_one_at_a_time_join_into_the_same_entry() -> None:
    items = [
        tok("a", "m1", "agent"),
        tok("b", "m1", "agent"),
        ("custom", {"data": [1, 2]}),
        tok("c", "m1", "agent"),
        tok("d"),
    ]
    encoder = EventEncoder(max_event_bytes=1000)
    payload = join_entry([encoder.encode(kind, data) for kind, data in items])
    assert payload == encode_entry(items)
    assert [(e.type, e.data) for e in decode_entry(payload, 1, 1)] == items


def test_an_event_larger_than_the_cap_is_refused_with_a_typed_error() -> None:
    encoder = EventEncoder(max_event_bytes=100)
    encoder.encode("token", {"text": "x" * 40, "message_id": None, "node": None})
    with pytest.raises(EventTooLarge, match="max_event_bytes"):
        encoder.encode("token", {"text": "x" * 120, "message_id": None, "node": None})
    with pytest.raises(EventTooLarge):
        encoder.encode("custom", {"data": "y" * 100})


@pytest.mark.parametrize("meta", [(None, None), ("msg-1", "agent")])
@pytest.mark.parametrize("char", ["x", "é", "\n"])
def test_a_token_is_held_to_the_limit_by_its_whole_json_like_any_event(
    meta: tuple[str | None, str | None], char: str
) -> None:
    # The limit counted a token's text and metadata, not the 18 bytes around them: tokens
    # up to 18 bytes over max_event_bytes were stored.
    limit = 120
    for length in range(80):
        data = {"text": char * length, "message_id": meta[0], "node": meta[1]}
        size = len(orjson.dumps(["token", data]))
        if size <= limit:
            EventEncoder(limit).encode("token", data)
        else:
            with pytest.raises(EventTooLarge):
                EventEncoder(limit).encode("token", data)


def test_an_empty_token_is_measured_too() -> None:
    # Metadata filling the limit left no room for text, and an empty text was not measured.
    data = {"text": "", "message_id": "m" * 200, "node": None}
    with pytest.raises(EventTooLarge):
        EventEncoder(max_event_bytes=64).encode("token", data)


def test_a_long_malformed_offset_is_not_echoed_whole() -> None:
    # Its message is the body of a 400: a 60 KB Last-Event-ID came back in full.
    with pytest.raises(InvalidOffset) as raised:
        parse_offset("9" * 60_000)
    assert len(str(raised.value)) < 300 and "60000 chars" in str(raised.value)


def test_an_entry_payload_holds_no_more_memory_than_its_bytes() -> None:
    # orjson hands back its whole output buffer (at least 1 KiB, 4 KiB since orjson 3.12)
    # even for a 20-byte entry; stored payloads (the memory transport, a run's rollback
    # window) held 100 to 200 times their size.
    import tracemalloc

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        payloads = [join_entry([f"t{i} "]) for i in range(1000)]
        payloads += [encode_entry([tok("a", "m1", "agent"), ("end", {})]) for _ in range(1000)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    size = sum(len(p) for p in payloads)
    assert held < size + 100 * len(payloads)  # the bytes, a bytes header and the list


def test_lone_surrogates_are_stored_as_u_fffd_in_any_event() -> None:
    # Regression: a lone UTF-16 surrogate (UTF-8 cannot hold one) raised TypeError, which
    # ended the run: a provider's "\ud83d" escape cut across two chunks stopped an answer.
    @dataclasses.dataclass
    class Note:
        text: str

    items = [
        tok("x\ud800y"),
        tok("\udc00 lone low", "m1", "agent"),
        ("custom", {"name": "n\ud800", "data": {"k\udfff": ["v\ud800", Note("n\udc00")]}}),
        ("token", {"text": "a\ud800b", "message_id": "m1", "node": "agent", "ns": ["s"]}),
        ("error", {"error": "RuntimeError", "message": "cut \ud83d"}),
    ]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == [
        tok("x\ufffdy"),
        tok("\ufffd lone low", "m1", "agent"),
        ("custom", {"name": "n\ufffd", "data": {"k\ufffd": ["v\ufffd", {"text": "n\ufffd"}]}}),
        ("token", {"text": "a\ufffdb", "message_id": "m1", "node": "agent", "ns": ["s"]}),
        ("error", {"error": "RuntimeError", "message": "cut \ufffd"}),
    ]
    with pytest.raises(TypeError):  # what JSON cannot hold otherwise still raises
        encode_entry([("custom", {"name": "n\ud800", "data": 2**70})])


def test_a_pair_split_across_two_tokens_of_one_message_is_joined() -> None:
    # A token ending with the first half of a pair keeps it back for the next token of its
    # message; anything else (another message, another event, the end) gets U+FFFD for it.
    items = [
        tok("a\ud83d", "m1", "agent"),
        tok("\ude00b", "m1", "agent"),
        tok("\ud83d"),  # a token of that half alone: nothing written yet
        tok("\ude00"),
        tok("c\ud83d", "m1", "agent"),
        tok("\ude00d", "m2", "agent"),  # another message's: not joined
        tok("e\ud83d"),
        ("custom", {"data": 1}),
        tok("f\ud83d"),
        tok("g"),
        tok("h\ud83d", "m1", "agent"),  # the end
    ]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == [
        tok("a", "m1", "agent"),
        tok("\U0001f600b", "m1", "agent"),
        tok("\U0001f600"),
        tok("c", "m1", "agent"),
        tok("\ufffd", "m1", "agent"),
        tok("\ufffdd", "m2", "agent"),
        tok("e"),
        tok("\ufffd"),
        ("custom", {"data": 1}),
        tok("f"),
        tok("\ufffdg"),
        tok("h", "m1", "agent"),
        tok("\ufffd", "m1", "agent"),
    ]


def test_token_metadata_holding_a_lone_surrogate_is_written_as_u_fffd() -> None:
    # Regression: a token whose message_id or node held a lone surrogate raised TypeError
    # (orjson refuses it), which ended the whole answer with an `error`.
    items = [
        tok("a", "m\ud800", "agent"),
        tok("b", "m\ud800", "agent"),  # the same metadata: written as a bare string
        tok("c\ud83d", "m", "node \udc00"),
        tok("\ude00d", "m", "node \udc00"),  # the pair of that message's tokens, joined
        ("token", {"text": "e", "message_id": {"k\udfff": "v\ud800"}, "node": None}),
        tok("f"),
    ]
    payload = encode_entry(items)
    assert payload.count(b'"m\xef\xbf\xbd"') == 1
    assert [(e.type, e.data) for e in decode_entry(payload, 1, 1)] == [
        tok("a", "m\ufffd", "agent"),
        tok("b", "m\ufffd", "agent"),
        tok("c", "m", "node \ufffd"),
        tok("\U0001f600d", "m", "node \ufffd"),
        ("token", {"text": "e", "message_id": {"k\ufffd": "v\ufffd"}, "node": None}),
        tok("f"),
    ]
    with pytest.raises(TypeError, match="'token' event cannot be written"):
        encode_entry([tok("x", "m\ud800", 2**70)])  # what JSON cannot hold otherwise


def sub(text: str, message_id: str = "m", **more: object) -> tuple[str, dict]:
    """A token with keys besides its text and metadata: a subgraph's (``ns``) by default."""
    data = {"text": text, "message_id": message_id, "node": "agent", "ns": ["sub:1"]}
    return ("token", {**data, **more})


def test_a_pair_split_across_tokens_with_more_keys_is_joined() -> None:
    # Regression: a subgraph's token (`ns`) or a reasoning one ending with the first half of
    # a pair was written with U+FFFD, and so was the second half in the next one: the
    # character was lost where a plain token's arrives whole.
    items = [
        sub("a\ud83d"),
        sub("\ude00b"),
        sub("\ud83d"),  # that half alone: nothing written yet
        sub("\ude00", usage={"output_tokens": 2}),  # more keys: still the message's text
        sub("c\ud83d"),
        sub("\ude00d", ns=["other:2"]),  # another subgraph's: not joined
        sub("e\ud83d"),
        tok("\ude00f", "m", "agent"),  # the parent graph's: not joined
        sub("", reasoning="think \ud83d"),
        sub("", reasoning="\ude00 more"),
        sub("", reasoning="\ud83d"),  # reasoning's half, then text: not joined
        sub("\ude00g"),
        sub("h\ud83d", finish_reason="stop"),  # the end
    ]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == [
        sub("a"),
        sub("\U0001f600b"),
        sub("\U0001f600", usage={"output_tokens": 2}),
        sub("c"),
        sub("\ufffd"),
        sub("\ufffdd", ns=["other:2"]),
        sub("e"),
        sub("\ufffd"),
        tok("\ufffdf", "m", "agent"),
        sub("", reasoning="think "),
        sub("", reasoning="\U0001f600 more"),
        sub("", reasoning="\ufffd"),
        sub("\ufffdg"),
        sub("h", finish_reason="stop"),
        sub("\ufffd"),
    ]


def test_a_half_held_by_a_token_with_more_keys_keeps_the_metadata_of_bare_tokens() -> None:
    # The U+FFFD of a half pair a reasoning token held is a token of text alone: written
    # with its metadata as stored (lone surrogates replaced), and the bare tokens after it
    # keep theirs.
    more = {"text": "b\ud83d", "message_id": "m\ud800", "node": None, "usage": {"n": 1}}
    items = [tok("a", "m1"), ("token", more), tok("c", "m1"), tok("d", "m1")]
    assert [(e.type, e.data) for e in decode_entry(encode_entry(items), 1, 1)] == [
        tok("a", "m1"),
        ("token", {**more, "text": "b", "message_id": "m\ufffd"}),
        tok("\ufffd", "m\ufffd"),
        tok("c", "m1"),
        tok("d", "m1"),
    ]


def test_valid_text_costs_no_copy_and_no_state() -> None:
    # The fast path stays as it was: valid text comes back as the very object given, and
    # the fast-path limits are not lowered (only a held half lowers them).
    encoder = EventEncoder(max_event_bytes=1000)
    limits = (encoder.plain_text_limit, encoder.text_limit)
    for text in ("ascii", "héllo \U0001f600", "日本"):
        assert encoder.token(text, None, None) is text
    assert (encoder.plain_text_limit, encoder.text_limit) == limits
    assert encoder.token("x\ud83d", None, None) == "x"
    assert (encoder.plain_text_limit, encoder.text_limit) == (-1, -1)  # all to the encoder
    assert encoder.token("\ude00", None, None) == "\U0001f600"
    assert (encoder.plain_text_limit, encoder.text_limit) == limits
