"""A token's text, in one place below the terminal chat and the server.

Tokens are decoded one by one with an incremental UTF-8 decoder: a token's text (its *piece*) is the
characters it completes, so a character split over several tokens belongs to the token holding its
last byte, and the pieces always join into the text. A token's offset is where its bytes begin in
that text (the legacy completions API's `text_offset`, and where transformers' fast tokenizer's
`return_offsets_mapping` starts it). With stop strings, text is released only once it can no longer
become one, and cut before the first; the tokens are released with their text and cut with it, so
log-probabilities stop where the text stops."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Piece:
    """One token's text in a stream: `payload` is the caller's (a token id, or its log-probabilities)."""

    payload: object
    offset: int
    text: str


class TextStream:
    """The text of tokens fed one by one; `feed` returns what became final, `finish` the rest, and
    `released()` the tokens whose text has been given out so far."""

    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...] = ()):
        self.token_bytes, self.stop = token_bytes, stop
        self.longest = max((len(s) for s in stop), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped, self.finished = "", 0, False, False
        self.pieces: list[Piece] = []
        self.given = 0  # pieces handed out by released()

    def feed(self, token: int, payload: object = None) -> str:
        if self.stopped or self.finished:
            return ""
        piece = self.decoder.decode(self.token_bytes(token))
        self.pieces.append(Piece(token if payload is None else payload, len(self.text), piece))
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped and not self.finished:
            tail = self.decoder.decode(b"", final=True)  # an unfinished character: U+FFFD
            if tail and self.pieces:
                self.pieces[-1].text += tail
            self.text += tail
        self.finished = True
        return self._release(final=True)

    def released(self) -> list[Piece]:
        """The pieces released since the last call: those whose text has been given out whole."""
        out = []
        while self.given < len(self.pieces):
            p = self.pieces[self.given]
            if p.offset + max(len(p.text), 1) > self.sent and not (self.finished or self.stopped):
                break
            out.append(p)
            self.given += 1
        return out

    def _release(self, final: bool) -> str:
        start = max(0, self.sent - self.longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self._cut(min(hits))
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _cut(self, at: int) -> None:
        """End the text at `at` (a stop string begins there): the tokens after it are dropped."""
        self.text, self.stopped = self.text[:at], True
        self.pieces = [p for p in self.pieces if p.offset < at]
        for p in self.pieces:
            p.text = p.text[: at - p.offset]
        self.given = min(self.given, len(self.pieces))

    def _held(self) -> int:
        """Characters at the end that begin some stop string, kept until it is clear they do not
        (linear in the stop strings' length for ordinary text)."""
        held = 0
        for s in self.stop:
            tail = self.text[len(self.text) - len(s) + 1 :] if len(s) > 1 else ""
            i = tail.find(s[0])
            while 0 <= i and len(tail) - i > held:
                if s.startswith(tail[i:]):
                    held = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return held


def pieces_of(ids: list[int], token_bytes: Callable[[int], bytes], start: int = 0) -> list[Piece]:
    """Each token's piece and offset in the text of `ids` (offsets counted from `start`)."""
    stream = TextStream(token_bytes)
    for t in ids:
        stream.feed(t)
    stream.finish()
    for p in stream.pieces:
        p.offset += start
    return stream.pieces


def _text(data: bytes) -> str | None:
    """A token's text alone, or None when its bytes are part of a character (not UTF-8 alone)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def spelled(data: bytes) -> str:
    """A token's own text as OpenAI's legacy logprobs spell it: its text, or `bytes:\\xe6\\x97` when its
    bytes are not text alone, so tokens with no text of their own stay apart."""
    text = _text(data)
    return text if text is not None else "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def logprobs_object(pieces: list[Piece], token_bytes: Callable[[int], bytes]) -> dict:
    """The legacy completions API's logprobs of pieces whose payloads are engine.TokenInfo: each
    token's text and offset as in the returned text (a token that is part of a character spelled by its
    bytes instead; a padded vocabulary row, which has none, by its id); the alternatives spelled alone,
    one entry each."""
    infos = [p.payload for p in pieces]
    own = [token_bytes(i.id) for i in infos]
    tokens = [
        p.text if _text(data) else spelled(data) or f"<|id:{i.id}|>" for p, data, i in zip(pieces, own, infos)
    ]
    top = [
        None if i.top is None else {spelled(token_bytes(t)) or f"<|id:{t}|>": lp for t, lp in i.top}
        for i in infos
    ]
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": top,
        "text_offset": [p.offset for p in pieces],
    }
