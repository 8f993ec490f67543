"""Incremental detokenization with stop strings, at the ingress (which holds the tokenizer)."""
from __future__ import annotations

from typing import Optional


class Detokenizer:
    """Feeds token ids, returns the new printable text. Holds back text that may still become
    a stop string or an incomplete UTF-8 character."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters already returned
        self.stopped = False

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        self.text = text
        # The earliest stop string in the text wins, whatever their order in the request.
        found = [at for s in self.stop if (at := self.text.find(s, max(0, self.sent - len(s)))) != -1]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
            return self._emit(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._emit(max(self.sent, len(self.text) - hold))

    def feed_message(self, items: list[tuple[int, Optional[str]]]) -> tuple[str, int, Optional[str]]:
        """One decode message's (token id, finish reason) pairs: returns the new text, how many
        tokens count (none after a stop string or the finish), and the finish reason or None."""
        text = ""
        for used, (token_id, finish, *_) in enumerate(items, 1):
            text += self.feed(token_id)
            reason = "stop" if self.stopped else finish
            if reason:
                return text + self.flush(), used, reason
        return text, len(items), None

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out
