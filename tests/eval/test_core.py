"""CORE: bundle format, prompt rendering, scoring of the three task types, centring, fetching."""
import functools
import http.server
import json
import random
import shutil
import socket
import threading
import zipfile

import pytest
import torch
from helpers import require_module

from nanopipe.eval.core import (
    SOURCE_FILE,
    EvalBundleInvalid,
    EvalBundleUnavailable,
    crop_sequences,
    evaluate_core,
    evaluate_example,
    fetch_eval_bundle,
    find_common_length,
    format_core_csv,
    render_prompts_lm,
    render_prompts_mc,
    render_prompts_schema,
)

BOS = 256


class ByteTokenizer:
    """nanopipe.tokenizer's encode/get_bos_token_id over raw UTF-8 bytes; remembers what it encoded."""

    def __init__(self):
        self.seen = []

    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None, append=None, num_threads=8):
        if isinstance(text, str):
            return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))
        self.seen.append(list(text))
        return [self.encode(t, prepend) for t in text]

    __call__ = encode


class FactModel(torch.nn.Module):
    """Knows a few strings ("facts"): wherever the input ends with the first j >= 8 characters of a fact,
    it puts a large logit on the fact's next character; elsewhere its logits are flat. It ignores
    everything before that suffix, so few-shot context does not change its answers."""

    MIN_MATCH = 8

    def __init__(self, facts, max_seq_len=None):
        super().__init__()
        self.facts = list(facts)
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, BOS + 1)
        for b in range(B):
            text = "".join(chr(t) for t in idx[b].tolist())
            for t in range(T):
                context = text[:t + 1]
                best = None
                for fact in self.facts:
                    for j in range(len(fact) - 1, self.MIN_MATCH - 1, -1):
                        if context.endswith(fact[:j]):
                            if best is None or j > best[0]:
                                best = (j, fact[j])
                            break
                if best is not None:
                    logits[b, t, ord(best[1])] = 10.0
        return logits


# ---------------------------------------------------------------------------
# A small bundle in the real layout, and the facts that make the model's answers known.

MC = [  # (query, choices, gold, which choice the model "believes")
    ("Question: capital of France?\nAnswer:", ["Paris", "Rome", "Oslo", "Lima"], 0, 0),
    ("Question: largest planet?\nAnswer:", ["Mars", "Jupiter", "Venus", "Pluto"], 1, 1),
    ("Question: boiling water, Celsius?\nAnswer:", ["50", "75", "100", "150"], 2, 2),
    ("Question: author of Hamlet?\nAnswer:", ["Dickens", "Austen", "Tolstoy", "Shakespeare"], 3, 3),
    ("Question: square root of 81?\nAnswer:", ["9", "8", "7", "6"], 0, 2),  # believes a wrong answer
    ("Question: colour of the sky?\nAnswer:", ["green", "blue", "red", "black"], 1, 3),  # wrong too
]
SCHEMA = [  # (context options, continuation, gold, believed option)
    (["The cup fell off the table", "The cup sang a happy song"], "and broke on the floor.", 0, 0),
    (["She opened the umbrella", "She opened the fridge door"], "because it was raining.", 0, 0),
    (["He was very thirsty", "He was very sleepy"], "so he drank some water.", 0, 0),
    (["The dog barked loudly", "The dog read a book"], "at the mailman.", 0, 1),
    (["The ice melted", "The ice froze harder"], "in the hot sun.", 0, 1),
    (["The baby cried", "The baby laughed"], "when it was hungry.", 0, 1),
]
LM = [  # (context, continuation, believed continuation or None)
    ("  The opposite of hot is ", "cold", "cold"),
    ("Two plus two equals", "four", "four"),
    ("The first letter of the alphabet is", "A", "A"),
    ("Water is made of hydrogen and", "oxygen", "oxygen"),
    ("The closest star to Earth is the", "Sun", "Sun"),
    ("The currency of Japan is the", "yen", None),  # does not know
]
LM_DELIM = "\nAnswer: "


def facts():
    out = [f"{q} {choices[b]}" for q, choices, _, b in MC]
    out += [f"{opts[b]} {cont}" for opts, cont, _, b in SCHEMA]
    out += [f"{ctx.strip()}{LM_DELIM}{c}" for ctx, _, c in LM if c is not None]
    return out


def write_bundle(root):
    """core.yaml + eval_meta_data.csv + eval_data/*.jsonl, as in the DCLM bundle (a subset of its columns)."""
    (root / "eval_data" / "world_knowledge").mkdir(parents=True)
    (root / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: tiny_mc\n  dataset_uri: world_knowledge/tiny_mc.jsonl\n  num_fewshot: [2]\n"
        "  icl_task_type: multiple_choice\n"
        "- label: tiny_schema\n  dataset_uri: tiny_schema.jsonl\n  num_fewshot: [1]\n"
        "  icl_task_type: schema\n  continuation_delimiter: ' '\n"
        "- label: tiny_lm\n  dataset_uri: tiny_lm.jsonl\n  num_fewshot: [3]\n"
        "  icl_task_type: language_modeling\n  continuation_delimiter: \"\\nAnswer: \"\n", encoding="utf-8")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
        "tiny_mc,world knowledge,multiple choice,2,6,25.0,,four choices\n"
        "tiny_schema,commonsense,schema,1,6,50,,two options\n"
        "tiny_lm,language understanding,language modeling,3,6,0,,exact match\n"
        "unused_task,x,y,0,1,10,,not in core.yaml\n", encoding="utf-8")

    def jsonl(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")  # trailing blank line

    jsonl(root / "eval_data/world_knowledge/tiny_mc.jsonl", [{"query": q, "choices": c, "gold": g} for q, c, g, _ in MC])
    jsonl(root / "eval_data/tiny_schema.jsonl",
          [{"context_options": o, "continuation": c, "gold": g} for o, c, g, _ in SCHEMA])
    jsonl(root / "eval_data/tiny_lm.jsonl", [{"context": ctx, "continuation": c} for ctx, c, _ in LM])
    return root


def expected(correct_flags, baseline, max_per_task=-1):
    flags = list(correct_flags)
    random.Random(1337).shuffle(flags)  # evaluate_core's fixed order
    if max_per_task > 0:
        flags = flags[:max_per_task]
    acc = sum(flags) / len(flags)
    return acc, (acc - 0.01 * baseline) / (1 - 0.01 * baseline)


MC_OK = [g == b for _, _, g, b in MC]
SCHEMA_OK = [g == b for _, _, g, b in SCHEMA]
LM_OK = [c == b for _, c, b in LM]


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


@pytest.mark.parametrize("max_per_task", [-1, 3, 2])
def test_evaluate_core_scores_known_answers(bundle, max_per_task):
    out = evaluate_core(FactModel(facts()), ByteTokenizer(), "cpu", bundle, max_per_task=max_per_task)
    for label, ok, rb in [("tiny_mc", MC_OK, 25.0), ("tiny_schema", SCHEMA_OK, 50.0), ("tiny_lm", LM_OK, 0.0)]:
        acc, centered = expected(ok, rb, max_per_task)
        assert out["results"][label] == pytest.approx(acc), label
        assert out["centered_results"][label] == pytest.approx(centered), label
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    if max_per_task < 0:  # the hand numbers: 4/6 at 25% chance, 3/6 at 50%, 5/6 at 0%
        assert out["centered_results"] == pytest.approx(
            {"tiny_mc": (4 / 6 - .25) / .75, "tiny_schema": 0.0, "tiny_lm": 5 / 6})
        assert list(out["results"]) == ["tiny_mc", "tiny_schema", "tiny_lm"]  # core.yaml order


def test_cropping_to_max_seq_len(bundle):
    full = evaluate_core(FactModel(facts()), ByteTokenizer(), "cpu", bundle)
    # 60 tokens keeps each prompt's own question/context but cuts the few-shot examples
    cropped = evaluate_core(FactModel(facts()), ByteTokenizer(), "cpu", bundle, max_seq_len=60)
    via_attribute = evaluate_core(FactModel(facts(), max_seq_len=60), ByteTokenizer(), "cpu", bundle)
    assert cropped == full == via_attribute
    tokens, starts, ends = crop_sequences([[BOS, 1, 2, 3, 4, 5], [BOS, 1, 2]], [3, 2], [6, 3], 4)
    assert tokens == [[2, 3, 4, 5], [BOS, 1, 2]] and starts == [1, 2] and ends == [4, 3]
    with pytest.raises(ValueError, match="does not fit"):
        crop_sequences([[BOS, 1, 2, 3, 4, 5]], [2], [6], 4)


# ---------------------------------------------------------------------------
# Prompts: exactly upstream's Jinja templates (copied verbatim from nanochat's core_eval.py)

UPSTREAM_MC = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}
{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
UPSTREAM_SCHEMA = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}
{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
UPSTREAM_LM = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}
{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


def upstream_prompts(task_type, item, delim, shots):
    jinja2 = require_module("jinja2")
    ctx = {"fewshot_examples": shots, "continuation_delimiter": delim, "item": item}
    if task_type == "multiple_choice":
        t = jinja2.Template(UPSTREAM_MC)
        return [t.render(choice=c, **ctx) for c in item["choices"]]
    if task_type == "schema":
        t = jinja2.Template(UPSTREAM_SCHEMA)
        return [t.render(context=o, **ctx) for o in item["context_options"]]
    t = jinja2.Template(UPSTREAM_LM)
    return [t.render(include_continuation=False, **ctx).strip(), t.render(include_continuation=True, **ctx)]


@pytest.mark.parametrize("delim", [" ", "\nAnswer: ", "", " \n "])
def test_rendering_matches_upstream_templates(delim):
    mc = [{"query": f" q{i} with  spaces \n", "choices": [f"a{i}", f" b{i} ", "c\n"], "gold": i % 3} for i in range(4)]
    schema = [{"context_options": [f"ctx {i}", f"  other {i}\n"], "continuation": f" cont {i} ", "gold": i % 2}
              for i in range(4)]
    lm = [{"context": f"\n  context {i}  \n", "continuation": f" cont{i} "} for i in range(4)]
    for shots in ([], mc[1:3], mc[1:]):
        assert render_prompts_mc(mc[0], delim, shots) == upstream_prompts("multiple_choice", mc[0], delim, shots)
    for shots in ([], schema[2:]):
        assert render_prompts_schema(schema[0], delim, shots) == upstream_prompts("schema", schema[0], delim, shots)
    for shots in ([], lm[1:]):
        assert render_prompts_lm(lm[0], delim, shots) == upstream_prompts("language_modeling", lm[0], delim, shots)


def test_fewshot_examples_seeded_per_example(bundle):
    data = [{"query": q, "choices": c, "gold": g} for q, c, g, _ in MC]
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    for idx in (0, 4):
        tok = ByteTokenizer()
        evaluate_example(idx, FactModel([]), tok, data, "cpu", meta)
        shots = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], 2)]
        assert tok.seen == [upstream_prompts("multiple_choice", data[idx], " ", shots)]


def test_find_common_length():
    assert find_common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert find_common_length([[1, 2], [1, 2, 3]], "left") == 2
    assert find_common_length([[9, 2, 3], [8, 7, 2, 3]], "right") == 2
    assert find_common_length([[1], [2]], "right") == 0


def test_format_core_csv():
    text = format_core_csv({"results": {"a": 0.5}, "centered_results": {"a": 0.25}, "core_metric": 0.25})
    assert text.splitlines() == [
        f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}",
        f"{'a':<35}, {'0.500000':<10}, {'0.250000':<10}",
        f"{'CORE':<35}, {'':<10}, {'0.250000':<10}",
    ]


# ---------------------------------------------------------------------------
# Fetching the zipped bundle

def zip_bundle(bundle, dest):
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            zf.write(p, "eval_bundle/" + str(p.relative_to(bundle)))  # upstream layout: a top-level eval_bundle/
    return dest


def test_fetch_from_file_url_then_cached(bundle, tmp_path):
    zipped = zip_bundle(bundle, tmp_path / "eval_bundle.zip")
    cache = tmp_path / "cache"
    got = fetch_eval_bundle(zipped.as_uri(), cache)
    assert got == cache / "eval_bundle"
    assert {p.name for p in got.iterdir()} == {"core.yaml", "eval_meta_data.csv", "eval_data", SOURCE_FILE}
    assert json.loads((got / SOURCE_FILE).read_text())["url"] == zipped.as_uri()
    assert [p.name for p in cache.iterdir()] == ["eval_bundle"]  # no zip or temp dirs left behind
    out = evaluate_core(FactModel(facts()), ByteTokenizer(), "cpu", got, max_per_task=2)
    assert set(out["results"]) == {"tiny_mc", "tiny_schema", "tiny_lm"}
    zipped.unlink()  # a second call uses the cache and does not fetch
    assert fetch_eval_bundle(zipped.as_uri(), cache) == got


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_over_http(bundle, tmp_path, http_server):
    served, base = http_server
    zip_bundle(bundle, served / "eval_bundle.zip")
    got = fetch_eval_bundle(f"{base}/eval_bundle.zip", tmp_path / "cache", timeout=10)
    assert (got / "eval_data/world_knowledge/tiny_mc.jsonl").read_text() == \
        (bundle / "eval_data/world_knowledge/tiny_mc.jsonl").read_text()
    with pytest.raises(EvalBundleUnavailable, match="404|not found|Not Found|NotFound"):
        fetch_eval_bundle(f"{base}/missing.zip", tmp_path / "cache2", timeout=10)


def test_unfetchable_url_raises_unavailable(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EvalBundleUnavailable) as e:
        fetch_eval_bundle(f"http://127.0.0.1:{port}/eval_bundle.zip", tmp_path / "cache", timeout=5)
    assert e.value.url.endswith("/eval_bundle.zip") and e.value.reason
    with pytest.raises(EvalBundleUnavailable, match="cannot fetch"):
        fetch_eval_bundle((tmp_path / "nowhere.zip").as_uri(), tmp_path / "cache", timeout=5)
    assert not (tmp_path / "cache" / "eval_bundle").exists()


def test_invalid_bundles_are_rejected_not_placed(bundle, tmp_path):
    not_zip = tmp_path / "page.zip"
    not_zip.write_text("<html>captive portal</html>")
    with pytest.raises(EvalBundleInvalid, match="not a zip"):
        fetch_eval_bundle(not_zip.as_uri(), tmp_path / "cache")
    (bundle / "eval_data/tiny_lm.jsonl").unlink()
    with pytest.raises(EvalBundleInvalid, match="tiny_lm: eval_data/tiny_lm.jsonl not found"):
        fetch_eval_bundle(zip_bundle(bundle, tmp_path / "b.zip").as_uri(), tmp_path / "cache")
    shutil.rmtree(bundle / "eval_data")
    with pytest.raises(EvalBundleInvalid, match="missing"):
        evaluate_core(FactModel([]), ByteTokenizer(), "cpu", bundle)
    assert not (tmp_path / "cache" / "eval_bundle").exists()


def test_evaluate_core_runs_a_tiny_gpt(bundle):
    """The real model and tokenizer through the real bundle format: bounded, consistent numbers."""
    from nanopipe.model.gpt import GPT, GPTConfig
    from nanopipe.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(iter([q for q, *_ in MC] * 5 + [c for c, *_ in LM] * 5), vocab_size=300)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                              window_pattern="L"))
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    out = evaluate_core(model, tok, "cpu", bundle, max_per_task=4)
    rb = {"tiny_mc": 0.25, "tiny_schema": 0.5, "tiny_lm": 0.0}
    for label, acc in out["results"].items():
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert out["centered_results"][label] == pytest.approx((acc - rb[label]) / (1 - rb[label]))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
