"""The model card (README.md of an export), from the run's config and metrics files.

Everything in it is read from what the pipeline recorded (metrics/<stage>.json and the checkpoint's
meta): nothing is typed in by hand, so the card cannot drift from the run. A metric that a stage did
not record (the stage did not run, or CORE was unavailable offline) is left out, never invented.
"""
from __future__ import annotations

from typing import Any, Mapping

from nanopipe.model.gpt import GPTConfig

CHAT_SKIP = {"step", "counts", "ChatCORE_tasks", "ChatCORE_complete", "time_s", "num_problems"}


def _num(x: Any, spec: str = ".4f") -> str | None:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def metric_rows(source: str, metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(stage, metric, value) rows: the pretraining and base-eval numbers, then the chat numbers of
    the source model (an SFT or RL export) as chat_eval measured them."""
    rows = []
    pre, base, sft, rl = (metrics.get(s, {}) for s in ("pretrain", "base_eval", "sft", "rl"))
    for stage, key, label in (("pretrain", "min_val_bpb", "val bpb (min)"), ("base_eval", "val_bpb", "val bpb"),
                              ("base_eval", "core_metric", "CORE")):
        value = _num((pre if stage == "pretrain" else base).get(key))
        if value is not None:
            rows.append((stage, label, value))
    if source in ("sft", "rl") and _num(sft.get("val_bpb")) is not None:
        rows.append(("sft", "val bpb (chat mixture)", _num(sft["val_bpb"])))
    if source == "rl":
        for key, value in sorted((rl.get("pass_at_k_end") or {}).items()):
            if _num(value) is not None:
                rows.append(("rl", f"{key} ({rl.get('task', '?')}, held out)", _num(value)))
    chat = (metrics.get("chat_eval") or {}).get(source)
    if isinstance(chat, Mapping):
        for key, value in chat.items():
            if key not in CHAT_SKIP and _num(value) is not None:
                rows.append(("chat_eval", key, _num(value)))
    return rows


def model_card(*, name: str, source: str, step: int | None, config: GPTConfig, num_params: int,
               metrics: Mapping[str, Mapping[str, Any]], git_commit: str, hf_dir: str = "models/hf") -> str:
    """README.md text: front matter for the Hub, what the model is, how to load it, its numbers."""
    chat = source in ("sft", "rl")
    kind = {"base": "pretrained base model", "sft": "chat model (supervised fine-tuning)",
            "rl": "chat model (SFT, then reinforcement learning)"}[source]
    head_dim = config.n_embd // config.n_head
    pre = metrics.get("pretrain", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [nanopipe, nanochat, custom_code]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {kind} trained from scratch by nanopipe (the nanochat LLM lifecycle as a "
        f"DVC + Hydra + MLflow pipeline), exported from `models/{source}` at step {step}, git commit `{git_commit[:12]}`.",
        "",
        "## Architecture",
        "",
        "nanochat's GPT: rotary embeddings, QK-norm, ReLU² MLP, value embeddings with input-dependent gates, "
        "per-layer residual/x0 lambdas, sliding-window attention, logits soft-capped at 15. The code ships with "
        "the weights (`modeling_nanopipe.py`), so loading needs `trust_remote_code=True`.",
        "",
        "| | |", "|---|---|",
        f"| parameters | {num_params:,} |",
        f"| layers | {config.n_layer} |",
        f"| width | {config.n_embd} ({config.n_head} heads of {head_dim}, {config.n_kv_head} KV heads) |",
        f"| context | {config.sequence_len} tokens; window pattern `{config.window_pattern}` |",
        f"| vocabulary | {config.vocab_size} (byte-level BPE, 9 special tokens) |",
    ]
    if _num(pre.get("total_tokens"), ",d") is not None:
        lines.append(f"| pretraining tokens | {pre['total_tokens']:,} |")
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{hf_dir}", trust_remote_code=True)',
              f'tok = AutoTokenizer.from_pretrained("{hf_dir}")']
    if chat:
        lines += ['inputs = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
                  '                                 return_dict=True, return_tensors="pt")',
                  "out = model.generate(**inputs, max_new_tokens=64)",
                  'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    else:
        lines += ['inputs = tok("The capital of France is", return_tensors="pt")  # <|bos|> first',
                  "out = model.generate(**inputs, max_new_tokens=32)",
                  "print(tok.decode(out[0], skip_special_tokens=True))"]
    lines += ["```", "",
              "`tok(text)` puts `<|bos|>` first, as the model was trained; `add_special_tokens=False` gives the "
              "plain encoding. The chat template renders a conversation exactly as nanopipe does (a system "
              "message is folded into the first user turn; assistant turns may hold text, `python` tool calls "
              "and `python_output` parts). Generation stops at `<|assistant_end|>` or `<|bos|>`.",
              "", "With lm-evaluation-harness:", "", "```bash",
              f"lm_eval --model hf --model_args pretrained={hf_dir},trust_remote_code=True,add_bos_token=True "
              "--tasks <tasks>", "```", ""]
    rows = metric_rows(source, metrics)
    lines += ["## Evaluation (from the run's metrics)", ""]
    if rows:
        lines += ["| stage | metric | value |", "|---|---|---:|", *[f"| {s} | {m} | {v} |" for s, m, v in rows]]
    else:
        lines.append("No evaluation metrics were recorded for this run.")
    return "\n".join(lines) + "\n"
