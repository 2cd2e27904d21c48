"""The calculator tool's call and result rendered readably (ToolText), and the rolling context
(chat_context) that lets a conversation outgrow the model's context."""
import pytest
from serve_doubles import ChatByteTokenizer, byte_level_tokenizer

from nanopipe.inference.chat_context import ContextFull, first_kept, fit_conversation, notice, reply_reserve
from nanopipe.inference.tool_text import ToolText, render_tokens
from nanopipe.serving.schemas import render_prompt

TOKENIZERS = {"real": byte_level_tokenizer, "double": ChatByteTokenizer}  # the double's decode drops specials


def tool_reply(tok, expr="2+3", result="5", before="Sum: ", after=" so é."):
    sp = tok.encode_special
    return (tok.encode(before) + [sp("<|python_start|>")] + tok.encode(expr) + [sp("<|python_end|>"),
            sp("<|output_start|>")] + tok.encode(result) + [sp("<|output_end|>")] + tok.encode(after))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_call_and_result_render_readably(name):
    tok = TOKENIZERS[name]()
    assert render_tokens(tok, tool_reply(tok)) == "Sum: 🧮 `2+3` → 5 so é."
    # a call the calculator refused has no output block: the call alone
    sp = tok.encode_special
    refused = [sp("<|python_start|>")] + tok.encode("import os") + [sp("<|python_end|>")] + tok.encode("!")
    assert render_tokens(tok, refused) == "🧮 `import os`!"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_piece_by_piece(name):
    """Pushed a token at a time the deltas add up to the whole, the call opens as soon as its token
    arrives (before the expression), and no delta holds half a UTF-8 character."""
    tok = TOKENIZERS[name]()
    ids = tool_reply(tok, before="€ ")
    text = ToolText(tok)
    deltas = [text.push(t) for t in ids]
    assert "".join(deltas) + text.flush() == "€ 🧮 `2+3` → 5 so é."
    assert not any("\ufffd" in d for d in deltas)
    start = ids.index(tok.encode_special("<|python_start|>"))
    assert deltas[start] == "🧮 `"  # shown the moment the model starts the call
    assert "".join(deltas[:start + 2]) == "€ 🧮 `2"  # ... and the expression as it decodes


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_cut_mid_call_or_mid_result_stays_balanced(name):
    tok = TOKENIZERS[name]()
    ids = tool_reply(tok)
    sp = tok.encode_special
    in_call = ids[: ids.index(sp("<|python_start|>")) + 3]  # "2+" of "2+3"
    assert render_tokens(tok, in_call) == "Sum: 🧮 `2+` (cut off)"
    in_result = ids[: ids.index(sp("<|output_start|>")) + 1]
    assert render_tokens(tok, in_result) == "Sum: 🧮 `2+3` → (cut off)"
    # a cut right after the call closed needs nothing more
    closed = ids[: ids.index(sp("<|python_end|>")) + 1]
    assert render_tokens(tok, closed) == "Sum: 🧮 `2+3`"
    # the renderer is reusable after a flush: the next reply starts in plain text
    text = ToolText(tok)
    "".join(text.push(t) for t in in_call)
    text.flush()
    assert "".join(text.push(t) for t in tok.encode("ok")) == "ok"


def test_markers_out_of_order_decode_as_they_are():
    tok = byte_level_tokenizer()
    sp = tok.encode_special
    ids = [sp("<|python_end|>")] + tok.encode("x") + [sp("<|output_end|>")]
    assert render_tokens(tok, ids) == tok.decode(ids) == "<|python_end|>x<|output_end|>"


# --- rolling context


def test_reply_reserve_leaves_room_for_history():
    assert reply_reserve(256, 512) == 64  # a quarter of the context
    assert reply_reserve(256, 20) == 20  # never more than asked for
    assert reply_reserve(32, 512) == 16  # a floor at tiny contexts
    assert reply_reserve(2048, 4096) == 512


def test_first_kept_drops_whole_groups_oldest_first():
    assert first_kept([10, 10, 10], 1, 100, 20) == 0
    assert first_kept([40, 30, 10], 1, 101, 20) == 0  # 1 + 40 + 30 + 10 + 20 = 101
    assert first_kept([40, 30, 10], 1, 100, 20) == 1  # 1 + 30 + 10 + 20 = 61
    assert first_kept([40, 30, 10], 1, 60, 20) == 2
    with pytest.raises(ContextFull, match="the message is 60 tokens; with 20 tokens kept for the reply it does "
                                          "not fit the model's context \\(64 tokens\\)"):
        first_kept([5, 60], 1, 64, 20)


def test_fit_conversation_drops_whole_exchanges_and_keeps_the_system_message():
    tok = ChatByteTokenizer()
    conv = [("system", "S"), ("user", "a" * 30), ("assistant", "b" * 30), ("user", "c" * 30),
            ("assistant", "d" * 30), ("user", "e" * 10)]
    fitted = fit_conversation(tok, conv, 128, 512, render_prompt)
    # 2 messages (the oldest exchange) dropped; the system text folded into the first kept user message
    assert fitted.dropped == 2
    assert fitted.prompt == render_prompt(tok, [("user", "S\n\n" + "c" * 30), ("assistant", "d" * 30), ("user", "e" * 10)])
    assert fitted.max_tokens == 128 - len(fitted.prompt) >= reply_reserve(128, 512)
    # everything fits: nothing dropped, the reply capped by max_tokens
    small = fit_conversation(tok, [("user", "hi")], 128, 10, render_prompt)
    assert small.dropped == 0 and small.max_tokens == 10 and small.prompt == render_prompt(tok, [("user", "hi")])
    with pytest.raises(ContextFull):
        fit_conversation(tok, [("user", "x"), ("assistant", "y"), ("user", "z" * 120)], 128, 512, render_prompt)


def test_notice_text():
    assert notice(4, 256) == "4 earlier messages no longer fit the model's 256-token context and were dropped"
    assert notice(1, 64) == "1 earlier message no longer fits the model's 64-token context and was dropped"
