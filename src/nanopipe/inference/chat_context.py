"""Rolling context: a conversation longer than the model's context keeps its newest turns.

Used by the two chat surfaces that hold a conversation, `nanopipe chat` and the web UI's
/chat/completions (the OpenAI route keeps refusing an over-long conversation, as OpenAI does).
nanopipe's models have short contexts (256 tokens at the smoke/cpu presets), so a chat of a few
turns outgrows them; refusing the next turn (a 400) or forgetting every earlier turn (reserving the
whole context for the reply) both dead-end the conversation. Instead (docs/decisions.md, D16):

- a reply is guaranteed `reply_reserve` tokens: min(max_tokens, max(MIN_REPLY, context // 4)), a
  quarter of the context, so three quarters are left for history; the reply may then use
  everything the kept conversation leaves (up to max_tokens), the reserve is only a floor;
- when the conversation plus the reserve does not fit, the oldest turns go first, whole (a user
  message with the assistant replies after it, never half an exchange); a leading system message
  is kept, folded into the first kept user message as the prompt rendering does;
- the caller tells the user how many messages were dropped (`notice`);
- only a newest turn that alone (with the reserve) does not fit is an error (ContextFull).
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_REPLY = 16  # tokens: at tiny contexts a quarter would leave no room for an answer


class ContextFull(ValueError):
    """The newest message alone does not fit the model's context with room for a reply."""


@dataclass
class Fitted:
    prompt: list[int]  # the tokens to generate from
    dropped: int  # how many of the oldest messages were left out
    max_tokens: int  # the reply's budget: what the kept conversation leaves, up to max_tokens


def reply_reserve(context: int, max_tokens: int) -> int:
    """Tokens a reply is guaranteed (see the module docstring)."""
    return max(1, min(max_tokens, max(MIN_REPLY, context // 4)))


def first_kept(lengths: list[int], fixed: int, context: int, reserve: int) -> int:
    """The index of the oldest group (of `lengths` token counts) that can be kept so that `fixed`
    + the kept groups + `reserve` fit in `context`. The last group is never dropped: ContextFull
    when it alone does not fit."""
    total = fixed + sum(lengths)
    for i, n in enumerate(lengths):
        if total + reserve <= context:
            return i
        if i == len(lengths) - 1:
            break
        total -= n
    raise ContextFull(f"the message is {lengths[-1] if lengths else 0} tokens; with {reserve} tokens kept for the "
                      f"reply it does not fit the model's context ({context} tokens). Shorten it")


def notice(dropped: int, context: int) -> str:
    """What the user is told when earlier messages were dropped."""
    s = "message no longer fits" if dropped == 1 else "messages no longer fit"
    return f"{dropped} earlier {s} the model's {context}-token context and {'was' if dropped == 1 else 'were'} dropped"


def groups(conversation: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Messages in exchanges: each group starts at a user message and holds the replies after it."""
    out: list[list[tuple[str, str]]] = []
    for role, text in conversation:
        if role == "user" or not out:
            out.append([])
        out[-1].append((role, text))
    return out


def fit_conversation(tokenizer, conversation: list[tuple[str, str]], context: int, max_tokens: int,
                     render) -> Fitted:
    """The prompt for `conversation` ([(role, text)], an optional leading ("system", text) first),
    rendered by `render(tokenizer, [(role, text)])`, with the oldest exchanges dropped as needed."""
    system = None
    if conversation and conversation[0][0] == "system":
        system, conversation = conversation[0][1], conversation[1:]
    exchanges = groups(conversation)
    reserve = reply_reserve(context, max_tokens)
    # each message renders as <|start|> text <|end|>; the prompt adds <|bos|> and <|assistant_start|>
    lengths = [sum(2 + len(tokenizer.encode(text)) for _, text in g) for g in exchanges]
    start = first_kept(lengths, 2, context, reserve)
    while True:  # the estimate ignores the system text and token merges across the fold: check the real prompt
        kept = [m for g in exchanges[start:] for m in g]
        if system is not None:
            kept = [("user", system + "\n\n" + kept[0][1]), *kept[1:]] if kept[0][0] == "user" else [("user", system), *kept]
        prompt = render(tokenizer, kept)
        if len(prompt) + reserve <= context:
            dropped = sum(len(g) for g in exchanges[:start])
            return Fitted(prompt, dropped, min(max_tokens, context - len(prompt)))
        if start == len(exchanges) - 1:
            raise ContextFull(f"the message is {len(prompt)} tokens; with {reserve} tokens kept for the reply it "
                              f"does not fit the model's context ({context} tokens). Shorten it")
        start += 1
