"""Incremental detokenization with stop strings, at the ingress (which holds the tokenizer)."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@lru_cache(maxsize=8)
def _token_kinds(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """The ids of SentencePiece byte-fallback tokens (<0x41>; Gemma-3 has them, byte-level BPE
    like Qwen's has none), and of special tokens. A decoder joins a run of byte tokens into
    characters, special tokens in between are skipped, and one invalid byte turns the whole run
    into replacement characters: so text is never settled inside a run."""
    byte_ids = frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))
    return byte_ids, frozenset(tokenizer.all_special_ids)


class Detokenizer:
    """Feeds token ids, returns the new printable text. Holds back text that may still become
    a stop string or an incomplete character.

    Each token decodes only a short window, not the whole answer, so a token costs the same at
    position 10 and 10,000 (decoding the whole answer per token made long answers quadratic in
    the Ingress; docs/performance.md). The text is still exactly what decoding the whole answer
    gives: the answer is split only at settled boundaries, where what comes later cannot change
    the text before (a complete character, not inside a byte-fallback run), and the window starts
    one settled boundary earlier, so that decoders which treat their first token differently (a
    stripped leading space) see the same first token as before. Tested against whole decodes on
    byte-level and byte-fallback tokenizers (tests/test_engine.py)."""

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens  # vLLM's: no stop string ends an answer of fewer tokens
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters already returned
        self.stopped = False
        self._bytes, self._special = _token_kinds(tokenizer)
        self._in_byte_run = False  # the last token that is not skipped is a byte token
        self._latest = ""  # the whole answer's text, also while held back
        self._settled, self._settled_text = 0, ""  # ids[:settled] decode to this, whatever follows
        self._window, self._window_head = 0, ""  # ids[window:settled] decode to window_head
        self._window_text = ""  # ids[window:] decoded, at the last token

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._latest = text = self._decode_answer()
        if token_id not in self._special:
            self._in_byte_run = token_id in self._bytes
        if text.endswith("\ufffd") or self._in_byte_run:  # a character may be incomplete
            if self._in_byte_run or not self.stop:
                return ""
            # Byte-level BPE: the text before an incomplete character is final, so a stop string
            # there ends the answer now, not when (if ever) the character completes.
            held, self.text = self.text, text.rstrip("\ufffd")
            if self._cut_at_stop():
                return self._emit(len(self.text))
            self.text = held
            return ""
        self.text = text
        self._settle()
        if self._cut_at_stop():
            return self._emit(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._emit(max(self.sent, len(self.text) - hold))

    def feed_message(self, items: list[tuple[int, Optional[str]]]) -> tuple[str, int, Optional[str]]:
        """One decode message's (token id, finish reason) pairs: returns the new text, how many
        tokens count (none after a stop string or the finish), and the finish reason or None."""
        text = ""
        for used, (token_id, finish, *_) in enumerate(items, 1):
            text += self.feed(token_id)
            if self.stopped or finish:
                text += self.flush()  # which may still find a stop string in text held back
                return text, used, "stop" if self.stopped else finish
        return text, len(items), None

    def flush(self) -> str:
        """The rest of the text once the answer ends. A character still incomplete then stays out,
        as a replacement character would say nothing."""
        if not self.stopped and len(self._latest) > len(self.text):
            self.text = self._latest.rstrip("\ufffd")
            self._cut_at_stop()
        return self._emit(len(self.text))

    def _cut_at_stop(self) -> bool:
        """End the text before the earliest stop string in it, whatever their order in the request."""
        if len(self.ids) < self.min_tokens:
            return False
        found = [at for s in self.stop if (at := self.text.find(s, max(0, self.sent - len(s)))) != -1]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
        return bool(found)

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces before punctuation: it would join text across a window's start
        # (Qwen3-VL's and Gemma-3's tokenizers have it off anyway).
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode_answer(self) -> str:
        self._window_text = window = self._decode(self.ids[self._window:])
        if window.startswith(self._window_head):
            return self._settled_text + window[len(self._window_head):]
        # A decoder whose window does not start as before: decode the whole answer from now on.
        self._window = self._settled = 0
        self._settled_text = self._window_head = ""
        self._window_text = text = self._decode(self.ids)
        return text

    def _settle(self) -> None:
        """self.text (complete, not in a byte run) is the answer's text for good: split here."""
        head = self._decode(self.ids[self._settled:])
        if head:  # the next window starts at the last boundary
            self._window, self._window_head = self._settled, head
        else:  # nothing there for a decoder to treat as first (a special token, a stripped space):
            self._window_head = self._window_text  # keep the window's start, now ending here
        self._settled, self._settled_text = len(self.ids), self.text

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


class TokenPieces:
    """Each token's own text and bytes, for logprobs (OpenAI's `token` and `bytes`). A token that
    holds part of a character has its own bytes, and a replacement character for its text."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self._bytes, self._special = _token_kinds(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and "ByteLevel" in str(backend.decoder.__getstate__())
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()} if byte_level else None
        self._piece = lru_cache(maxsize=1 << 16)(self._compute)  # bounded: vocabularies reach 262k

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        text, raw = self._piece(token_id)
        return text, list(raw)

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if token_id in self._bytes:  # <0xE2>
            raw = bytes([int(piece[3:5], 16)])
        elif token_id not in self._special and self._byte_decoder and all(c in self._byte_decoder for c in piece):
            raw = bytes(self._byte_decoder[c] for c in piece)  # GPT-2's byte alphabet: 'Ġ' is a space
        else:  # special tokens as written; SentencePiece pieces with '▁' for a space
            raw = (piece if token_id in self._special else piece.replace("▁", " ")).encode()
        return raw.decode("utf-8", errors="replace"), raw
