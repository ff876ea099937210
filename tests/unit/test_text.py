from edgespec.text import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    return "".join(stream.feed(p) for p in pieces) + stream.flush()


def test_plain_text_passes_through():
    assert feed_all(TextStream(), [b"hel", b"lo ", b"world"]) == "hello world"


def test_utf8_character_split_across_tokens():
    data = "héllo €".encode()
    stream = TextStream()
    out = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + stream.flush() == "héllo €"
    assert "\ufffd" not in "".join(out)


def test_stop_string_inside_one_token():
    stream = TextStream(stop=("END",))
    assert feed_all(stream, [b"abc END xyz"]) == "abc "
    assert stream.stopped


def test_stop_string_across_tokens_is_held_back_then_cut():
    stream = TextStream(stop=("</answer>",))
    first = stream.feed(b"42 </ans")
    assert first == "42 "  # "</ans" could start the stop string
    assert stream.feed(b"wer> more") == ""
    assert stream.stopped and stream.flush() == ""


def test_held_text_is_released_when_it_does_not_become_a_stop_string():
    stream = TextStream(stop=("STOP",))
    assert stream.feed(b"ST") == ""
    assert stream.feed(b"ART") == "START"
    assert feed_all(stream, [b" ok"]) == " ok"
    assert not stream.stopped


def test_flush_releases_a_held_prefix_at_the_end():
    stream = TextStream(stop=("STOP",))
    assert stream.feed(b"the ST") == "the "
    assert stream.flush() == "ST"
