"""The `tok_eval` stage (nanochat's tok_eval.py): compression of our tokenizer against GPT-2's and GPT-4's.

Bytes per token on fixed sample texts and on the first `tokenizer.eval_chars` characters of the
train and val shards.
"""
from __future__ import annotations

from nanopipe import paths
from nanopipe.data.shards import read_manifest, sample_text, split_paths
from nanopipe.stage import Stage
from nanopipe.tokenizer import load_tokenizer
from nanopipe.tokenizer.evaluate import console_report, evaluate_tokenizer

PARAMS = ["tokenizer.eval_chars"]


def run(st: Stage) -> None:
    tokenizer = load_tokenizer(paths.TOKENIZER)
    train, val = split_paths(read_manifest())
    n = st.cfg.tokenizer.eval_chars
    metrics, markdown = evaluate_tokenizer(tokenizer, val_text=sample_text([val], n), train_text=sample_text(train, n))
    print(console_report(metrics))
    summary = metrics["summary"]
    available = {f"{k}_available": v["available"] for k, v in metrics["baselines"].items()}  # reasons: in the report
    st.finish({"bytes_per_token_val": summary["ours_ratio_val"], **summary, **available}, markdown)
