"""nanopipe.tokenizer.chat pinned down to the token: render masks, truncation defaults and the exact
error messages (the cases mutation testing found unpinned, docs/testing.md).

A stand-in tokenizer makes every id hand-computable: a character is its code point, a special
token is 100000 + its index below, BOS is 99999."""
import pytest

from nanopipe.tokenizer.chat import PART_TYPES, _messages, render_conversation, render_for_completion

SPECIALS = ["user_start", "user_end", "assistant_start", "assistant_end", "python_start", "python_end",
            "output_start", "output_end"]
BOS = 99999
US, UE, AS, AE, PS, PE, OS, OE = (100000 + i for i in range(len(SPECIALS)))


class CharTok:
    def encode(self, text):
        return [ord(c) for c in text]

    def encode_special(self, name):
        assert name.startswith("<|") and name.endswith("|>"), name
        return 100000 + SPECIALS.index(name[2:-2])

    def get_bos_token_id(self):
        return BOS


TOK = CharTok()


def conv(*messages):
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def error(fn, *args):
    with pytest.raises(ValueError) as e:
        fn(*args)
    return str(e.value)


def test_every_row_of_the_mask_table_exactly():
    c = conv(("user", "ab"), ("assistant", [
        {"type": "text", "text": "x"},
        {"type": "python", "text": "1+1"},
        {"type": "python_output", "text": "2"},
        {"type": "text", "text": "y"},
    ]), ("user", "c"), ("assistant", "ok"))
    ids, mask = render_conversation(TOK, c)
    assert ids == [BOS, US, 97, 98, UE,
                   AS, 120, PS, 49, 43, 49, PE, OS, 50, OE, 121, AE,
                   US, 99, UE,
                   AS, 111, 107, AE]
    assert mask == [0, 0, 0, 0, 0,
                    0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1,
                    0, 0, 0,
                    0, 1, 1, 1]


def test_system_message_folded_with_exactly_two_messages():
    c = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    messages, offset = _messages(c)
    assert messages == [{"role": "user", "content": "S\n\nU"}] and offset == 1
    assert render_conversation(TOK, c) == ([BOS, US, 83, 10, 10, 85, UE], [0] * 7)
    messages, offset = _messages(conv(("user", "U")))
    assert messages == [{"role": "user", "content": "U"}] and offset == 0


def test_default_max_tokens_is_2048_and_truncates_ids_and_mask_alike():
    c = conv(("user", "u"), ("assistant", "a" * 3000))
    ids, mask = render_conversation(TOK, c)
    assert len(ids) == len(mask) == 2048
    assert ids[:5] == [BOS, US, 117, UE, AS] and mask[:5] == [0] * 5 and mask[5:] == [1] * 2043
    ids, mask = render_conversation(TOK, c, 7)
    assert ids == [BOS, US, 117, UE, AS, 97, 97] and mask == [0, 0, 0, 0, 0, 1, 1]
    long_prompt = conv(("user", "u" * 3000), ("assistant", "a"))
    assert len(render_for_completion(TOK, long_prompt)) == 2049  # 2048 rendered + <|assistant_start|>
    assert render_for_completion(TOK, long_prompt, 3) == [BOS, US, 117, AS]


def test_render_for_completion_exact_prompt():
    c = conv(("user", "hi"), ("assistant", "yo"), ("user", "q"), ("assistant", "drop me"))
    assert render_for_completion(TOK, c) == [BOS, US, 104, 105, UE, AS, 121, 111, AE, US, 113, UE, AS]
    assert len(c["messages"]) == 4


@pytest.mark.parametrize("c,msg", [
    (None, "conversation must be a dict with a 'messages' list, got NoneType"),
    ({"msgs": [], "b": 1}, "conversation must be a dict with a 'messages' list, got dict with keys ['b', 'msgs']"),
    ({"messages": "x"}, "conversation must be a dict with a 'messages' list, got dict with keys ['messages']"),
    ({"messages": ["hello"]}, "message 0 must be a dict with 'role' and 'content', got 'hello'"),
    ({"messages": [{"content": "x"}]}, "message 0 must be a dict with 'role' and 'content', got {'content': 'x'}"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     "message 1 must be a dict with 'role' and 'content', got {'role': 'assistant'}"),
    ({"messages": ["x" * 200]}, "message 0 must be a dict with 'role' and 'content', got '" + "x" * 79),
    ({"messages": [{"role": "system", "content": "s"}]},
     "message 0 is a system message, so message 1 must be from user, got nothing"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 0 is a system message, so message 1 must be from user, got assistant"),
    ({"messages": [{"role": "system", "content": 5}, {"role": "user", "content": "u"}]},
     "message 0 (system) content must be a str, got int"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ["u"]}]},
     "message 1 (user) content must be a str, got list"),
    ({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "u"}]},
     "message 0 (system) has empty content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ""}]},
     "message 1 (user) has empty content"),
    ({"messages": []}, "conversation has no messages"),
])
def test_malformed_conversation_messages(c, msg):
    assert error(render_conversation, TOK, c) == msg
    assert error(_messages, c) == msg


@pytest.mark.parametrize("c,msg", [
    (conv(("assistant", "a")),
     "message 0 is from 'assistant' but should be from 'user' (roles must alternate user/assistant, starting with user)"),
    (conv(("user", "a"), ("user", "b")),
     "message 1 is from 'user' but should be from 'assistant' (roles must alternate user/assistant, starting with user)"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "message 3 is from 'assistant' but should be from 'user' (roles must alternate user/assistant, starting with user)"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": ""}]}, "message 2 (assistant) has empty content"),
    (conv(("user", "a"), ("assistant", [])), "message 1 (assistant) has empty content"),
    (conv(("user", [])), "message 0 (user) has empty content"),
    (conv(("user", {})), "message 0 (user) content must be a str, got dict"),
    (conv(("user", ["a"])), "message 0 (user) content must be a str, got list"),
    (conv(("user", "a"), ("assistant", {})),
     "Unknown content type dict in message 1 (assistant); expected str or list of parts"),
    (conv(("user", "a"), ("assistant", None)),
     "Unknown content type NoneType in message 1 (assistant); expected str or list of parts"),
    (conv(("user", "a"), ("assistant", ["abc"])), "message 1 part 0 must be a dict with a str 'text', got 'abc'"),
    (conv(("user", "a"), ("assistant", [{"type": "text", "text": "ok"}, {"type": "text", "text": 5}])),
     "message 1 part 1 must be a dict with a str 'text', got {'type': 'text', 'text': 5}"),
    (conv(("user", "a"), ("assistant", ["y" * 200])), "message 1 part 0 must be a dict with a str 'text', got '" + "y" * 79),
    (conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])),
     f"Unknown part type 'image' in message 1 part 0; expected one of {PART_TYPES}"),
    (conv(("user", "a"), ("assistant", [{"text": "x"}])),
     "Unknown part type None in message 1 part 0; expected one of ('text', 'python', 'python_output')"),
])
def test_malformed_conversation_rendering(c, msg):
    assert error(render_conversation, TOK, c) == msg


@pytest.mark.parametrize("c,msg", [
    (None, "render_for_completion: conversation must be a dict with a non-empty 'messages' list"),
    ({"msgs": [1]}, "render_for_completion: conversation must be a dict with a non-empty 'messages' list"),
    ({"messages": []}, "render_for_completion: conversation must be a dict with a non-empty 'messages' list"),
    ({"messages": "ab"}, "render_for_completion: conversation must be a dict with a non-empty 'messages' list"),
    (conv(("user", "a")), "render_for_completion: the last message (index 0) must be from the assistant "
                          "(it is replaced by the completion), got 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, "x"]},
     "render_for_completion: the last message (index 1) must be from the assistant "
     "(it is replaced by the completion), got 'str'"),
    ({"messages": [{"role": "user", "content": "a"}, {"content": "x"}]},
     "render_for_completion: the last message (index 1) must be from the assistant "
     "(it is replaced by the completion), got None"),
])
def test_render_for_completion_errors(c, msg):
    assert error(render_for_completion, TOK, c) == msg
