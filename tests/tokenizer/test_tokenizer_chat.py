"""Conversation rendering: one test per row of the mask table, plus malformed input."""
import copy

import pytest

from nanopipe.tokenizer import render_conversation, render_for_completion, visualize_tokenization


def sp(tok, name):
    return tok.encode_special(f"<|{name}|>")


def conv(*messages):
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def test_user_row_all_masked_out(tok):
    ids, mask = tok.render_conversation(conv(("user", "What is 2+2?")))
    body = tok.encode("What is 2+2?")
    assert ids == [tok.get_bos_token_id(), sp(tok, "user_start"), *body, sp(tok, "user_end")]
    assert mask == [0] * len(ids)


def test_assistant_text_row_supervised(tok):
    ids, mask = tok.render_conversation(conv(("user", "hi"), ("assistant", "Hello! 你好")))
    n_user = 3 + len(tok.encode("hi"))
    reply = tok.encode("Hello! 你好")
    assert ids[n_user:] == [sp(tok, "assistant_start"), *reply, sp(tok, "assistant_end")]
    assert mask[:n_user] == [0] * n_user
    assert mask[n_user:] == [0] + [1] * len(reply) + [1]  # start 0, text 1, end 1
    # the same text as a "text" part renders identically
    parts = conv(("user", "hi"), ("assistant", [{"type": "text", "text": "Hello! 你好"}]))
    assert tok.render_conversation(parts) == (ids, mask)


def test_python_call_row_supervised_with_delimiters(tok):
    c = conv(("user", "q"), ("assistant", [{"type": "python", "text": "12*7"}]))
    ids, mask = tok.render_conversation(c)
    call = tok.encode("12*7")
    i = ids.index(sp(tok, "python_start"))
    assert ids[i:] == [sp(tok, "python_start"), *call, sp(tok, "python_end"), sp(tok, "assistant_end")]
    assert mask[i:] == [1] * (len(call) + 3)


def test_python_output_row_context_only(tok):
    c = conv(("user", "q"), ("assistant", [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": " So #### 84"},
    ]))
    ids, mask = tok.render_conversation(c)
    i = ids.index(sp(tok, "output_start"))
    out = tok.encode("84")
    assert ids[i:i + len(out) + 2] == [sp(tok, "output_start"), *out, sp(tok, "output_end")]
    assert mask[i:i + len(out) + 2] == [0] * (len(out) + 2)
    tail = tok.encode(" So #### 84")
    assert mask[i + len(out) + 2:] == [1] * (len(tail) + 1)
    assert mask[ids.index(sp(tok, "python_end"))] == 1


def test_system_merged_into_first_user(tok):
    c = {"messages": [{"role": "system", "content": "Be terse."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    before = copy.deepcopy(c)
    merged = conv(("user", "Be terse.\n\nHi"), ("assistant", "Yo"))
    assert tok.render_conversation(c) == tok.render_conversation(merged)
    assert c == before  # the caller's conversation is not modified


def test_multi_turn_alternation_and_truncation(tok):
    c = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"))
    ids, mask = tok.render_conversation(c)
    assert ids.count(sp(tok, "user_start")) == 3 and ids.count(sp(tok, "assistant_end")) == 2
    assert ids[-1] == sp(tok, "user_end")  # need not end with the assistant
    short_ids, short_mask = tok.render_conversation(c, max_tokens=5)
    assert short_ids == ids[:5] and short_mask == mask[:5]
    assert render_conversation(tok, c) == (ids, mask)  # module function == method


def test_render_for_completion(tok):
    c = conv(("user", "2+2?"), ("assistant", "4"))
    ids = tok.render_for_completion(c)
    prompt, _ = tok.render_conversation(conv(("user", "2+2?")))
    assert ids == prompt + [sp(tok, "assistant_start")]
    assert render_for_completion(tok, c) == ids
    assert len(c["messages"]) == 2  # not modified
    with pytest.raises(ValueError, match=r"last message \(index 0\) must be from the assistant"):
        tok.render_for_completion(conv(("user", "hi")))


@pytest.mark.parametrize("c,match", [
    (conv(("assistant", "hi")), r"message 0 is from 'assistant' but should be from 'user'"),
    (conv(("user", "a"), ("user", "b")), r"message 1 is from 'user' but should be from 'assistant'"),
    (conv(("user", "a"), ("assistant", "b"), ("assistant", "c")), "message 2 is from 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "user", "content": "x"}]}, "message 2 is from 'user'"),  # index in caller's list
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 1 must be from user"),
    (conv(("user", "a"), ("system", "late")), "message 1 is from 'system'"),
    ({"messages": []}, "no messages"),
    ({"msgs": []}, "'messages' list"),
    (conv(("user", "")), "message 0 \\(user\\) has empty content"),
    (conv(("user", "a"), ("assistant", "")), "message 1 \\(assistant\\) has empty content"),
    (conv(("user", "a"), ("assistant", [])), "message 1 \\(assistant\\) has empty content"),
    (conv(("user", ["not", "str"])), "message 0 \\(user\\) content must be a str, got list"),
    (conv(("user", "a"), ("assistant", 42)), "Unknown content type int in message 1"),
    (conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])),
     "Unknown part type 'image' in message 1 part 0"),
    (conv(("user", "a"), ("assistant", [{"type": "text"}])), "message 1 part 0 must be a dict with a str 'text'"),
    ({"messages": [{"role": "user"}]}, "message 0 must be a dict with 'role' and 'content'"),
])
def test_malformed_conversations(tok, c, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(c)


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation(conv(("user", "hi"), ("assistant", "yo")))
    out = visualize_tokenization(tok, ids, mask)
    assert out.count("\033[92m") == mask.count(1) and out.count("\033[91m") == mask.count(0)
    assert out.count("\033[0m|") == len(ids) - 1 and "<|bos|>" in out
    with_ids = tok.visualize_tokenization(ids, mask, with_token_id=True)
    assert f"({ids[0]})" in with_ids and with_ids.count("\033[0m|") == 2 * len(ids) - 1
