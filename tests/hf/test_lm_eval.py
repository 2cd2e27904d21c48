"""lm-evaluation-harness on the exported model, offline, on local tasks this test writes: a
multiple-choice loglikelihood task and a generate-until task. lm-eval's numbers must equal what our
own model, tokenizer and Engine compute on the same items."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_cfg, require_module, subprocess_env
from hf_fixtures import tiny_model, tiny_tokenizer

from nanopipe.eval.core import forward_model
from nanopipe.hf.export import export_model
from nanopipe.inference.engine import Engine

require_module("lm_eval")
require_module("accelerate")

MC_DOCS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), f"{a * b} apples"], "label": i % 3}
           for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (12, 30), (4, 4)])]
GEN_QUESTIONS = ["Say hello", "Spell apple", "Count to three", "Name a colour", "def f(x):", "naïve café"]
UNTIL, MAX_GEN = ["\n"], 12

MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


# -----------------------------------------------------------------------------
# Our own evaluation of the same items (the reference lm-eval must agree with)


def our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | <|bos|> context), tokens split as lm-eval splits them:
    the whole string is encoded and the context's tokens cut off its front."""
    whole = tok.encode(context + continuation, prepend="<|bos|>")
    n_ctx = len(tok.encode(context, prepend="<|bos|>"))
    losses, _ = forward_model(model, torch.tensor([whole]))
    return -losses[0, n_ctx - 1:len(whole) - 1].double().sum().item()


def our_mc(model, tok, doc) -> dict:
    context = f"Question: {doc['question']}\nAnswer:"
    lls = [our_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
    norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # acc_norm: per character of the choice
    return {"lls": lls, "acc": float(lls.index(max(lls)) == doc["label"]),
            "acc_norm": float(norm.index(max(norm)) == doc["label"])}


def our_generation(model, tok, question: str) -> str:
    """Greedy from <|bos|> + prompt with our Engine, stop tokens dropped, cut at the first stop string."""
    prompt = tok.encode(f"Q: {question}\nA:", prepend="<|bos|>")
    rows, masks, _ = Engine(model, tok).generate_rows(prompt, max_tokens=MAX_GEN, temperature=0)
    assert all(masks[0][len(prompt):]), "the calculator fired"
    special = {tok.encode_special(s) for s in tok.get_special_tokens()}
    text = tok.decode([t for t in rows[0][len(prompt):] if t not in special])
    for stop in UNTIL:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """models/hf of a tiny random model, and the two local tasks. Half of the generate-until targets are
    what our Engine generates, so lm-eval's exact match must come out at exactly 0.5."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok, model = tiny_tokenizer(), tiny_model()
    export_model(model, tok, root / "models/hf", eos_token="<|assistant_end|>", provenance={"source": "sft", "step": 3},
                 card="")
    generations = [our_generation(model, tok, q) for q in GEN_QUESTIONS]
    assert len(set(generations)) > 1 and all(g.strip() for g in generations)
    gen_docs = [{"question": q, "answer": g if i % 2 == 0 else g + " (not it)"}
                for i, (q, g) in enumerate(zip(GEN_QUESTIONS, generations))]
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs, yaml_text in (("mc", MC_DOCS, MC_YAML), ("gen", gen_docs, GEN_YAML)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tasks / f"{name}.yaml").write_text(yaml_text.format(data=tasks / f"{name}.jsonl"))
    ours = [our_mc(model, tok, d) for d in MC_DOCS]
    return root, model, tok, ours, generations


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_per_item_scores_equal_ours(setup, offline):
    """Every loglikelihood lm-eval computed through transformers equals ours (fp32), every greedy
    generation is our Engine's text; batch 4, so generate-until runs left-padded batches."""
    from nanopipe.eval.harness import run_lm_eval

    root, _, _, ours, generations = setup
    results = run_lm_eval(root / "models/hf", ["toy_mc", "toy_gen"], include_path=str(root / "tasks"),
                          batch_size=4, log_samples=True)
    mc = sorted(results["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(MC_DOCS)
    for sample, mine in zip(mc, ours):
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(mine["lls"], abs=1e-4), sample["doc"]
        assert (sample["acc"], sample["acc_norm"]) == (mine["acc"], mine["acc_norm"])
    gen = sorted(results["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in gen] == generations


def test_stage_records_accuracies_equal_to_ours(setup, offline, monkeypatch):
    from nanopipe.stage import run_stage
    from nanopipe.stages import lm_eval as stage

    root, _, _, ours, _ = setup
    monkeypatch.chdir(root)
    run_stage(stage, make_cfg("experiment=smoke", "tracking.enabled=false", "runtime.device=cpu",
                              "lm_eval.tasks=[toy_mc,toy_gen]", f"lm_eval.include_path={root / 'tasks'}",
                              "lm_eval.batch_size=1"))
    m = json.loads((root / "metrics/lm_eval.json").read_text())
    acc = sum(o["acc"] for o in ours) / len(ours)
    acc_norm = sum(o["acc_norm"] for o in ours) / len(ours)
    assert m["results"]["toy_mc"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert m["results"]["toy_mc"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert m["results"]["toy_gen"]["exact_match"] == 0.5  # the targets that are our generations, and only those
    assert m["n_samples"] == {"toy_mc": len(MC_DOCS), "toy_gen": len(GEN_QUESTIONS)}
    assert m["model"] == {"path": "models/hf", "source": "sft", "step": 3}
    section = (root / "metrics/sections/lm_eval.md").read_text()
    assert "| toy_mc | acc |" in section and "| toy_gen | exact_match | 0.5000 |" in section


def test_bad_inputs_are_named(tmp_path, setup, offline):
    from nanopipe.eval.harness import HarnessError, run_lm_eval

    root = setup[0]
    with pytest.raises(HarnessError, match=r"config.json: not found; run the `export` stage"):
        run_lm_eval(tmp_path / "models/hf", ["toy_mc"])
    with pytest.raises(HarnessError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(root / "models/hf", ["no_such_task"], include_path=str(root / "tasks"))


def test_lm_eval_cli_on_the_export(setup, tmp_path):
    """The documented command line, `lm_eval --model hf`, in a fresh process: the same accuracy."""
    root, _, _, ours, _ = setup
    env = subprocess_env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    cli = [sys.executable, "-c", "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"]
    p = subprocess.run([*cli, "--model", "hf", "--model_args",
                        f"pretrained={root / 'models/hf'},trust_remote_code=True,add_bos_token=True",
                        "--tasks", "toy_mc", "--include_path", str(root / "tasks"), "--device", "cpu",
                        "--batch_size", "2", "--output_path", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (result_file,) = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result_file.read_text())["results"]["toy_mc"]["acc,none"]
    assert acc == pytest.approx(sum(o["acc"] for o in ours) / len(ours), abs=1e-12)
