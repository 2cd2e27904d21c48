"""Terminal chat (run_chat): one-shot and interactive loops, UTF-8 safe streaming, context trimming."""
import io

from nanopipe.serving.app import render_prompt
from nanopipe.stages.chat import run_chat
from nanopipe.inference.engine import Engine
from serve_doubles import ChatByteTokenizer, scripted_reply_model, tiny_gpt

REPLY = "Hi é€😀!"


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def inputs(*lines):
    it = iter(lines)

    def fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError
    return fn


def test_one_shot_prompt_streams_valid_utf8():
    out = Recorder()
    replies = run_chat(scripted_reply_model(REPLY), ChatByteTokenizer(), prompt="Hello", output=out)
    assert replies == [REPLY]
    assert out.getvalue() == f"{REPLY}\n"  # one-shot: the reply and nothing else (`> out.txt`)
    assert not any("\ufffd" in w for w in out.writes)
    assert len([w for w in out.writes if w in "Hi é€😀!"]) >= 5  # streamed piece by piece
    # --prompt clear / quit are just prompts in one-shot mode (nanochat looped forever on 'clear')
    assert run_chat(scripted_reply_model(REPLY), ChatByteTokenizer(), prompt="clear", output=io.StringIO()) == [REPLY]


def test_interactive_loop_commands():
    out = io.StringIO()
    replies = run_chat(scripted_reply_model(REPLY), ChatByteTokenizer(),
                       input_fn=inputs("Hello", "", "clear", "Again", "QUIT", "never read"), output=out)
    text = out.getvalue()
    assert replies == [REPLY, REPLY]
    assert "nanopipe chat" in text and "Type 'clear' to start a new conversation" in text
    assert "Conversation cleared." in text and text.endswith("Goodbye!\n")
    out = io.StringIO()
    assert run_chat(scripted_reply_model(REPLY), ChatByteTokenizer(), input_fn=inputs(), output=out) == []
    assert out.getvalue().endswith("\nGoodbye!\n")  # EOF


def test_old_turns_are_dropped_to_fit_the_context():
    out, notes = io.StringIO(), io.StringIO()
    # the double's context is 128; a 54-token message + its 10-token reply is one 64-token exchange,
    # and 20 tokens are kept for the next reply: two exchanges never fit together
    msg = "x" * 50
    replies = run_chat(scripted_reply_model(REPLY), ChatByteTokenizer(), max_tokens=20,
                       input_fn=inputs(msg, "short", msg, "y" * 200, "exit"), output=out, notices=notes)
    assert len(replies) == 3
    assert notes.getvalue().splitlines() == [
        # "short" (8 tokens) fits beside the first exchange (1 + 64 + 8 + 20 <= 128); the third message does not
        "(2 earlier messages no longer fit the model's 128-token context and were dropped)",
        "(message not sent: the message is 203 tokens; with 20 tokens kept for the reply it does not fit the "
        "model's 128-token context. Shorten it)"]
    assert "earlier" not in out.getvalue()  # notices never mix into the conversation


def test_real_gpt_reply_matches_engine():
    model, tok = tiny_gpt(), ChatByteTokenizer()
    replies = run_chat(model, tok, prompt="Hi", temperature=0.0, max_tokens=10, output=io.StringIO())
    prompt = render_prompt(tok, [("user", "Hi")])
    expected = []
    for column, _ in Engine(model, tok).generate(prompt, max_tokens=10, temperature=0.0):
        if column[0] in (260, 261):
            break
        expected.append(column[0])
    assert replies == [tok.decode(expected)]
