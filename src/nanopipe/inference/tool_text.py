"""Readable text for a reply that uses the calculator tool, as it streams.

The model calls its tool with special tokens (nanochat's engine.py; see ToolTokens/step_row in
nanopipe.inference.engine): `<|python_start|>expr<|python_end|>` is the call, and when the
calculator answers, the engine forces `<|output_start|>result<|output_end|>` after it. Decoded as
they are, those show up as raw markup (or vanish, with a tokenizer that drops specials). ToolText
turns the token stream into markdown-friendly text instead:

    <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>   ->   🧮 `2+3` → 5

piece by piece, as the tokens arrive (the 🧮 and the opening backtick at `<|python_start|>`, the
expression as it decodes, the closing backtick at `<|python_end|>`, " → " at `<|output_start|>`),
never splitting a UTF-8 character (TextStream underneath). A reply cut inside a call or its output
(max_tokens, a cancelled request) still ends in balanced markdown: `flush()` closes the code span
and says it was cut off. One renderer for every surface that shows text: `nanopipe chat`, the web
UI's /chat/completions and the OpenAI API's `content` (both through serving.streaming.text_events).
"""
from __future__ import annotations

from nanopipe.inference.engine import TextStream, ToolTokens

CALL_OPEN, CALL_CLOSE, RESULT = "🧮 `", "`", " → "
CUT = " (cut off)"


class ToolText:
    """Token ids in, text deltas out: `push(token)` per token, `flush()` at the end of the reply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = ToolTokens(tokenizer)
        self.stream = TextStream(tokenizer)
        self.state = "text"  # "text" | "call" (inside python_start..python_end) | "output"
        self.fresh = True  # nothing shown since the last marker

    def push(self, token: int) -> str:
        s = self.special
        marker = {s.python_start: ("text", "call", CALL_OPEN), s.python_end: ("call", "text", CALL_CLOSE),
                  s.output_start: ("text", "output", RESULT), s.output_end: ("output", "text", "")}.get(token)
        if marker is None:
            out = self.stream.push(token)
            self.fresh = self.fresh and not out
            return out
        expected, after, text = marker
        if self.state != expected:  # a marker out of order (a model improvising): shown as it decodes
            return self.stream.push(token)
        # the text held so far (a partial character, at most) belongs before the marker
        out = self.stream.flush() + text
        self.state, self.fresh = after, True
        return out

    def flush(self) -> str:
        """What is still held, and the markup that closes a call or result the reply was cut in."""
        out = self.stream.flush()
        if self.state == "call":
            out += CALL_CLOSE + CUT
        elif self.state == "output":
            out += CUT.lstrip() if self.fresh and not out else CUT  # " → " already ends in a space
        self.state = "text"
        return out


def render_tokens(tokenizer, tokens) -> str:
    """A whole reply's tokens as readable text (what streaming them through ToolText gives)."""
    text = ToolText(tokenizer)
    return "".join(text.push(t) for t in tokens) + text.flush()
