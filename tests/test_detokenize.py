"""Stop strings of several tokens, streamed text held back only while it could
still be a stop string (issue #19), on a real byte-level BPE tokenizer."""

import random

import pytest

from mixattn.data import load_tokenizer
from mixattn.detokenize import StopStringError, TextStream, check_stops


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "tok" / "tokenizer.json")


def _stream(tok, ids, stops):
    s = TextStream(tok, stops)
    pieces = []
    for t in ids:
        pieces.append(s.push(t))
        if s.stopped is not None:
            break
    pieces.append(s.finish())
    return s, pieces


def test_a_stop_string_of_several_tokens_cuts_the_text_before_it(tok):
    text = "def f(x):\n    return x\n\n\ndef g(y):\n    return y\n"
    ids = tok.encode_batch([text])[0]
    stops = ["\n\n", "return y", "(y):\n", "f(x"]
    assert all(len(tok.encode_batch([stop])[0]) >= 2 for stop in stops[1:])  # stops of several tokens
    for stop in stops:
        s, pieces = _stream(tok, ids, [stop])
        assert s.stopped == stop
        assert "".join(pieces) == text.split(stop, 1)[0] == s.text
        assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_the_earliest_of_several_stops_wins_and_no_stop_streams_everything(tok):
    text = "alpha beta gamma delta"
    ids = tok.encode_batch([text])[0]
    s, pieces = _stream(tok, ids, ["delta", "beta g"])
    assert s.stopped == "beta g" and "".join(pieces) == "alpha "
    s, pieces = _stream(tok, ids, ["zeta", "gamma!"])
    assert s.stopped is None and "".join(pieces) == text


def test_text_is_held_back_only_while_it_may_become_a_stop(tok):
    text = "x = 1\ny = 2\n"
    ids = tok.encode_batch([text])[0]
    s = TextStream(tok, ["= 3"])
    out = ""
    for t in ids:
        out += s.push(t)
        held = s.text[len(out):]
        assert held == "" or "= 3".startswith(held)  # only a prefix of the stop is ever held back
    assert out + s.finish() == text


def test_a_character_split_between_tokens_is_never_shown_in_halves(tok):
    text = "naïve café — ünïcödé ✓"
    ids = tok.encode_batch([text])[0]
    split = [i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i])]
    assert split, "the byte-level BPE splits some of these characters across tokens"
    s = TextStream(tok)
    pieces = [s.push(t) for t in ids] + [s.finish()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text


def test_random_texts_and_stops_equal_a_whole_decode(tok):
    rng = random.Random(0)
    words = ["def", " ", "\n", "\n\n", "return", "(", ")", ":", "x", "_y", "é", "  "]
    for _ in range(40):
        text = "".join(rng.choice(words) for _ in range(30))
        stop = "".join(rng.choice(words) for _ in range(2))
        s, pieces = _stream(tok, tok.encode_batch([text])[0], [stop])
        assert "".join(pieces) == (text.split(stop, 1)[0] if stop in text else text)


def test_bad_stops_are_named():
    with pytest.raises(StopStringError, match=r"--stop\[1\] is '': a stop string must be a non-empty string"):
        check_stops(["a", ""], "--stop")
    with pytest.raises(StopStringError, match=r"stop\[0\] is 3"):
        check_stops([3])
