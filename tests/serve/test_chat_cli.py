"""Terminal chat (run_chat): one-shot and interactive loops, UTF-8 safe streaming, context trimming."""
import io

from serve_doubles import ChatByteTokenizer, scripted_reply_model, tiny_gpt

from nanopipe.inference.engine import Engine
from nanopipe.serving.app import render_prompt
from nanopipe.stages.chat import run_chat

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
            raise EOFError from None
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
        "model's context (128 tokens). Shorten it)"]
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


# --- `nanopipe chat` as users run it: a subprocess in a directory holding a model and params.yaml

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_cfg, subprocess_env  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

TEN_TURNS = ["hello there", "what is two plus two", "tell me more", "and then?", "why so", "go on",
             "one more thing", "are you sure", "ok thanks", "bye now"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """params.yaml (smoke), a byte-level tokenizer and an untrained 128-token-context model as models/sft."""
    from serve_doubles import byte_level_tokenizer

    from nanopipe import paths
    from nanopipe.model.checkpoint import save_checkpoint
    from nanopipe.model.gpt import config_from_depth, create_model

    d = tmp_path_factory.mktemp("chat")
    (d / "params.yaml").write_text(OmegaConf.to_yaml(make_cfg("experiment=smoke", "runtime.threads=1")))
    tok = byte_level_tokenizer()
    tok.save(d / paths.TOKENIZER)
    torch.manual_seed(0)
    model = create_model(config_from_depth(1, tok.get_vocab_size(), 128, 64, 64, "L"), "cpu")
    save_checkpoint(d / paths.CHECKPOINTS["sft"], model, None, {"step": 1}, save_rng=False)
    return d


def nanopipe_chat(chat_dir, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "nanopipe.cli", "chat", *args], cwd=chat_dir, input=stdin,
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)


def in_process(chat_dir, monkeypatch, lines=None, **kw):
    """run_chat on the same checkpoint in this process, reading `lines` as input() would (its prompt
    written to stdout): (stdout, stderr notices, the prompts generated from, the tokenizer)."""
    from nanopipe import paths
    from nanopipe.model.checkpoint import load_model
    from nanopipe.tokenizer import load_tokenizer

    monkeypatch.chdir(chat_dir)
    tok = load_tokenizer(paths.TOKENIZER)
    model, _ = load_model(paths.CHECKPOINTS["sft"], "cpu", "eval", tokenizer=tok)
    prompts, generate = [], Engine.generate

    def spy(self, tokens, *a, **k):
        prompts.append(list(tokens))
        return generate(self, tokens, *a, **k)
    monkeypatch.setattr(Engine, "generate", spy)
    out, notes = io.StringIO(), io.StringIO()
    if lines is not None:
        feed = iter(lines)

        def input_fn(prompt):
            out.write(prompt)
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None
        kw["input_fn"] = input_fn
    run_chat(model, tok, output=out, notices=notes, **kw)
    return out.getvalue(), notes.getvalue(), prompts, tok


def test_one_shot_stdout_holds_only_the_reply(chat_dir, monkeypatch):
    p = nanopipe_chat(chat_dir, "--prompt", "hi", "--temperature", "0", "--max-tokens", "12")
    assert p.returncode == 0, p.stderr
    expected, _, _, _ = in_process(chat_dir, monkeypatch, prompt="hi", temperature=0.0, max_tokens=12)
    assert p.stdout == expected and expected.endswith("\n") and len(expected) > 1
    # device autodetection and the stage's log lines went to stderr, in the log format
    assert "[nanopipe] Autodetected device type: cpu" in p.stderr


@pytest.mark.slow
def test_ten_turns_over_stdin_keep_history_and_replay_with_a_seed(chat_dir, monkeypatch):
    session = "\n".join(TEN_TURNS) + "\n"
    args = ["--seed", "3", "--temperature", "0.9", "--max-tokens", "24"]
    first, again = nanopipe_chat(chat_dir, *args, stdin=session), nanopipe_chat(chat_dir, *args, stdin=session)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout  # the same seed replays the whole session
    other = nanopipe_chat(chat_dir, "--seed", "4", *args[2:], stdin=session)
    assert other.stdout != first.stdout  # ... and another seed samples other replies
    # the subprocess is run_chat: the same replies and notices as in this process, whose prompts we can see
    out, notes, prompts, tok = in_process(chat_dir, monkeypatch, TEN_TURNS, seed=3, temperature=0.9, max_tokens=24)
    assert first.stdout == out
    assert first.stdout.count("\nAssistant: ") == 10
    dropped = [line for line in first.stderr.splitlines() if "earlier messages no longer fit" in line]
    assert [f"({line.split('(', 1)[1]}" for line in dropped] == notes.splitlines()
    # history: every turn's prompt holds the previous user message, until turns start being dropped
    # (the 128-token context keeps two or three exchanges), and never more than fits with the reply
    assert len(prompts) == 10
    for k in range(1, 10):
        assert _contains(prompts[k], tok.encode(TEN_TURNS[k - 1])), f"turn {k + 1} forgot turn {k}"
        assert len(prompts[k]) + 24 <= 128
    assert 1 <= len(dropped) <= 9 and not _contains(prompts[-1], tok.encode(TEN_TURNS[0]))


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))
