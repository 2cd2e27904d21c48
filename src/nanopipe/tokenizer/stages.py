"""The `tokenizer` and `tok_eval` stages (nanochat's tok_train.py and tok_eval.py).

The tokenizer trains on the train shards only (never the validation shard) and is
saved to models/tokenizer/ (tokenizer.json + token_bytes.pt). tok_eval measures
compression (bytes/token) on the fixed sample texts and on the train and val shards.
"""
from __future__ import annotations

from omegaconf import DictConfig

from nanopipe import paths
from nanopipe.data.shards import iter_texts, read_manifest, split_paths
from nanopipe.stage import Stage
from nanopipe.tokenizer import load_tokenizer
from nanopipe.tokenizer.evaluate import console_report, evaluate_tokenizer
from nanopipe.tokenizer.fit import fit_tokenizer


def fit_main(cfg: DictConfig) -> None:
    t = cfg.tokenizer
    with Stage("tokenizer", cfg, sections=["tokenizer"]) as st:
        train, _ = split_paths(read_manifest())
        tokenizer, stats = fit_tokenizer(iter_texts(train), t.vocab_size, t.max_chars, t.doc_cap, t.trainer)
        tokenizer.save(paths.TOKENIZER)
        rows = "\n".join(f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items())
        st.finish(stats, "| key | value |\n|---|---|\n" + rows)


def _sample_text(shard_paths, max_chars: int) -> str:
    """The first documents of the given shards, joined, up to max_chars."""
    out, n = [], 0
    for docs in iter_texts(shard_paths):
        for d in docs:
            if n >= max_chars:
                return "\n".join(out)
            out.append(d[: max_chars - n])
            n += len(out[-1])
    return "\n".join(out)


def eval_main(cfg: DictConfig) -> None:
    with Stage("tok_eval", cfg, sections=["tokenizer"]) as st:
        tokenizer = load_tokenizer(paths.TOKENIZER)
        train, val = split_paths(read_manifest())
        n = cfg.tokenizer.eval_chars
        metrics, markdown = evaluate_tokenizer(tokenizer, val_text=_sample_text([val], n), train_text=_sample_text(train, n))
        print(console_report(metrics))
        summary = metrics["summary"]
        available = {f"{k}_available": v["available"] for k, v in metrics["baselines"].items()}  # reasons: in the report
        st.finish({"bytes_per_token_val": summary["ours_ratio_val"], **summary, **available}, markdown)
