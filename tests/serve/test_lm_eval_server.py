"""lm-evaluation-harness against the live chat server: `local-completions` over HTTP, offline,
tokenizing with the server's own tokenizer (its vLLM-style /tokenize endpoints), on the local
tasks of tests/hf/test_lm_eval.py (a multiple-choice loglikelihood task, a generate-until task).
Every loglikelihood and every generation must equal what the model computes directly."""
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_cfg, require_module

from nanopipe.serving.app import create_app, run_in_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))  # the HF tests' fixtures and tasks
from hf_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

require_module("lm_eval")
from test_lm_eval import GEN_QUESTIONS, GEN_YAML, MAX_GEN, MC_DOCS, MC_YAML, UNTIL  # noqa: E402


def direct_loglikelihood(model, tok, context, continuation):
    """Sum of log p(continuation | context), tokens split as lm-eval splits them (the whole
    string encoded, the context's tokens cut off its front), no <|bos|>: lm-eval's tokenized
    requests carry none."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(lps[j - 1, whole[j]].item() for j in range(n_ctx, len(whole)))


def direct_greedy(model, tok, prompt_text):
    ids = tok.encode(prompt_text)
    n = len(ids)
    with torch.no_grad():
        for _ in range(MAX_GEN):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    text = tok.decode(ids[n:])
    for stop in UNTIL:
        text = text.split(stop)[0]
    return text


@pytest.mark.slow  # lm-eval's import and task set-up alone take ~15 s
def test_lm_eval_local_completions_against_the_live_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = tiny_tokenizer()
    never = [tok.encode_special(s) for s in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    model = tiny_model(sequence_len=256, never=never)  # greedy streams run to max_gen_toks, no calculator
    generations = [direct_greedy(model, tok, f"Q: {q}\nA:") for q in GEN_QUESTIONS]
    assert len(set(generations)) > 1
    gen_docs = [{"question": q, "answer": g if i % 2 == 0 else g + " (not it)"}
                for i, (q, g) in enumerate(zip(GEN_QUESTIONS, generations))]
    for name, docs, yaml_text in (("mc", MC_DOCS, MC_YAML), ("gen", gen_docs, GEN_YAML)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp_path / f"{name}.yaml").write_text(yaml_text.format(data=tmp_path / f"{name}.jsonl"))

    cfg = make_cfg("experiment=smoke", "serve.temperature=0.0", "serve.max_batch=8").serve
    server, thread, port = run_in_thread(create_app(model, tok, cfg))
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        results = simple_evaluate(
            model="local-completions",
            model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=nanopipe,tokenizer_backend=auto,"
                       f"num_concurrent=1,max_retries=1,max_length=256,batch_size=4",
            tasks=["toy_mc", "toy_gen"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    finally:
        server.should_exit = True
        thread.join(30)
    assert results["config"]["model_args"]  # ran through the API model
    mc = sorted(results["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(MC_DOCS)
    accs = []
    for sample, doc in zip(mc, MC_DOCS):
        context = f"Question: {doc['question']}\nAnswer:"
        ours = [direct_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=2e-3), doc
        accs.append(float(ours.index(max(ours)) == doc["label"]))
        assert sample["acc"] == accs[-1]
    assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    gen = sorted(results["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in gen] == generations
    assert results["results"]["toy_gen"]["exact_match,none"] == 0.5  # the targets that are our generations
