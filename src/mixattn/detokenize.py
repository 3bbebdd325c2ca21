"""Token ids -> text as they are generated, with stop strings of any length.

What ``mixattn generate --stop`` and the server's ``stop`` field need: a stop
string may span several tokens (``"\\n\\n"`` is often two), and streamed text
must never show a stop string, nor a prefix of one that then completes, nor
half a UTF-8 character. Decoding follows vLLM's incremental scheme: each new
piece is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``, so a
tokenizer that drops a leading space when decoding from the middle
(SentencePiece) still gives the text a whole decode would, and the work per
token does not grow with the length of the output.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringError(ValueError):
    pass


def check_stops(stops: Sequence[str], where: str = "stop") -> list[str]:
    """The stop strings, refused if any is not a non-empty string (named)."""
    out = []
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise StopStringError(f"{where}[{i}] is {s!r}: a stop string must be a non-empty string")
        out.append(s)
    return out


class TextStream:
    """One sequence's output text. ``push(token)`` returns the text that has
    become final (possibly ""); text that could still turn out to be a stop
    string, and an incomplete character, are held back. Once a stop string
    appears, ``stopped`` names it, the text before it is final and nothing
    after it is returned (the OpenAI API's behaviour: the stop string is not
    part of the output). ``finish()`` returns what was held back when the
    sequence ends without a stop."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = check_stops(stops)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (final or held back)
        self.emitted = 0  # characters of self.text returned
        self.stopped: str | None = None
        self._prefix = 0  # ids[_prefix:_read] decode to the tail self.text already holds
        self._read = 0

    def push(self, token: int) -> str:
        if self.stopped is not None:
            return ""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""  # a character cut between tokens: wait for its remaining bytes
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.emitted - longest + 1)  # a stop can begin in text already returned only if it ends after it
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.stopped = min(hits)
            out = self.text[self.emitted:cut]
            self.text = self.text[:cut]
            self.emitted = max(self.emitted, cut)
            return out
        hold = 0  # the longest tail of the text that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self) -> str:
        """The rest, at the end of the sequence (max tokens or an EOS)."""
        if self.stopped is not None:
            return ""
        if self._read < len(self.ids):  # ended inside a character: its bytes as the tokenizer decodes them
            before = self.tokenizer.decode(self.ids[self._prefix:self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
            out = self._release()
            if self.stopped is not None:
                return out
            return out + self.finish()
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
