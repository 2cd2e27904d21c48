"""Conversation rendering: chat messages -> token ids plus a loss mask
(nanochat nanochat/tokenizer.py @1ec0a34, RustBPETokenizer.render_conversation).

A conversation is {"messages": [{"role": ..., "content": ...}, ...]}. Roles alternate
user, assistant, user, ... An optional leading system message is folded into the first
user message as "system\\n\\nuser" (there is no system token). mask 1 = supervise (the
model learns to produce it), 0 = context only:

    <|bos|>                                              0
    <|user_start|> user text <|user_end|>                0
    <|assistant_start|>                                  0
    assistant text (str content, or "text" parts)        1
    <|python_start|> tool call <|python_end|>            1   ("python" part)
    <|output_start|> tool output <|output_end|>          0   ("python_output" part: the environment supplies it)
    <|assistant_end|>                                    1

Malformed conversations raise ValueError naming the message (and part) index; these are
real checks, not asserts, so they also hold under `python -O`.
"""
from __future__ import annotations

PART_TYPES = ("text", "python", "python_output")


def _messages(conversation) -> tuple[list, int]:
    """Validated messages with a leading system message folded in, and the index offset
    back to the caller's list (1 when a system message was folded, else 0)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f"conversation must be a dict with a 'messages' list, got {type(conversation).__name__}"
                         + (f" with keys {sorted(conversation)}" if isinstance(conversation, dict) else ""))
    messages = conversation["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
    offset = 0
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            got = messages[1]["role"] if len(messages) > 1 else "nothing"
            raise ValueError(f"message 0 is a system message, so message 1 must be from user, got {got}")
        system, user = messages[0]["content"], messages[1]["content"]
        for i, c in ((0, system), (1, user)):
            if not isinstance(c, str):
                raise ValueError(f"message {i} ({messages[i]['role']}) content must be a str, got {type(c).__name__}")
            if not c:
                raise ValueError(f"message {i} ({messages[i]['role']}) has empty content")
        # a new list and a new dict: the caller's conversation is left untouched
        messages = [{**messages[1], "content": system + "\n\n" + user}] + messages[2:]
        offset = 1
    if not messages:
        raise ValueError("conversation has no messages")
    return messages, offset


def render_conversation(tokenizer, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Token ids and mask (same length, truncated to max_tokens) for a conversation."""
    messages, offset = _messages(conversation)
    ids: list[int] = []
    mask: list[int] = []

    def add(token_ids, mask_val):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids.extend(token_ids)
        mask.extend([mask_val] * len(token_ids))

    sp = tokenizer.encode_special
    user_start, user_end = sp("<|user_start|>"), sp("<|user_end|>")
    assistant_start, assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
    python_start, python_end = sp("<|python_start|>"), sp("<|python_end|>")
    output_start, output_end = sp("<|output_start|>"), sp("<|output_end|>")

    add(tokenizer.get_bos_token_id(), 0)
    for i, message in enumerate(messages):
        idx = i + offset  # index in the caller's list, for error messages
        role, content = message["role"], message["content"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {idx} is from {role!r} but should be from {expected!r} "
                             f"(roles must alternate user/assistant, starting with user)")
        if isinstance(content, (str, list)) and len(content) == 0:
            raise ValueError(f"message {idx} ({role}) has empty content")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {idx} (user) content must be a str, got {type(content).__name__}")
            add(user_start, 0)
            add(tokenizer.encode(content), 0)
            add(user_end, 0)
            continue
        add(assistant_start, 0)
        if isinstance(content, str):
            add(tokenizer.encode(content), 1)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {idx} part {j} must be a dict with a str 'text', got {part!r:.80}")
                ptype = part.get("type")
                if ptype not in PART_TYPES:
                    raise ValueError(f"Unknown part type {ptype!r} in message {idx} part {j}; expected one of {PART_TYPES}")
                value_ids = tokenizer.encode(part["text"])
                if ptype == "text":
                    add(value_ids, 1)
                elif ptype == "python":  # the model's own tool call: trained on, delimiters included
                    add(python_start, 1)
                    add(value_ids, 1)
                    add(python_end, 1)
                else:  # tool output comes from the environment at inference: context only
                    add(output_start, 0)
                    add(value_ids, 0)
                    add(output_end, 0)
        else:
            raise ValueError(f"Unknown content type {type(content).__name__} in message {idx} (assistant); expected str or list of parts")
        add(assistant_end, 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation, max_tokens: int = 2048) -> list[int]:
    """Prompt ids for generation: drop the final assistant message, render the rest,
    and append <|assistant_start|> so the model continues as the assistant."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("render_for_completion: conversation must be a dict with a non-empty 'messages' list")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise ValueError(f"render_for_completion: the last message (index {len(messages) - 1}) must be from "
                         f"the assistant (it is replaced by the completion), got {role!r}")
    ids, _ = render_conversation(tokenizer, {**conversation, "messages": messages[:-1]}, max_tokens)
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids


def visualize_tokenization(tokenizer, ids, mask, with_token_id: bool = False) -> str:
    """Debug view: each token decoded on its own, green if supervised (mask 1), red if not."""
    RED, GREEN, GRAY, RESET = "\033[91m", "\033[92m", "\033[90m", "\033[0m"
    tokens = []
    for token_id, mask_val in zip(ids, mask):
        color = GREEN if mask_val == 1 else RED
        tokens.append(f"{color}{tokenizer.decode([token_id])}{RESET}")
        if with_token_id:
            tokens.append(f"{GRAY}({token_id}){RESET}")
    return "|".join(tokens)
