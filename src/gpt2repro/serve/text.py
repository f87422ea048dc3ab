"""Tokens into the text a client sees: released as it becomes final (whole UTF-8 characters only,
never text that may still turn into a stop string), cut before the first stop string, and the legacy
completions API's `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class TextStream:
    """The text of tokens fed one by one; `feed` returns what became final, `finish` the rest."""

    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...] = ()):
        self.token_bytes, self.stop = token_bytes, stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end that begin some stop string, kept until it is clear they do not."""
        for k in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0


def logprobs_object(infos: list, token_str: Callable[[int], str], start_offset: int = 0) -> dict:
    """The legacy completions API's logprobs for TokenInfos (engine.TokenInfo), offsets counted in
    characters from `start_offset`."""
    tokens, offsets, offset = [], [], start_offset
    for info in infos:
        text = token_str(info.id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [None if i.top is None else {token_str(t): lp for t, lp in i.top} for i in infos]
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": top,
        "text_offset": offsets,
    }
