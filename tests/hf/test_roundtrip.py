"""The Hugging Face export, proven by round trips: transformers reproduces our logits, greedy decoding,
tokenization and chat rendering, and nanopipe reads the export back bit for bit."""
from __future__ import annotations

import ast
import json
import random

import pytest
import torch
from helpers import require_module
from hf_fixtures import CONVERSATIONS, SEQ, fuzz_text, tiny_model, tiny_tokenizer

from nanopipe.hf.export import ExportError, compare_logits, export_model, load_exported, load_hf, verify_export
from nanopipe.inference.engine import Engine

require_module("transformers")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(never=[tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tok):
    out = tmp_path_factory.mktemp("export") / "hf"
    checks = export_model(model, tok, out, eos_token="<|assistant_end|>", provenance={"source": "sft", "step": 7},
                          card="# tiny\n")
    hf_model, hf_tok = load_hf(out)
    return out, checks, hf_model, hf_tok


def test_directory_holds_what_transformers_needs(exported):
    out, checks, hf_model, _ = exported
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json", "configuration_nanopipe.py",
                     "modeling_nanopipe.py", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "nanopipe.json", "README.md"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanopipe" and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanopipe.NanopipeForCausalLM"
    assert cfg["tie_word_embeddings"] is False and cfg["padded_vocab_size"] == 512
    assert type(hf_model).__name__ == "NanopipeForCausalLM"
    # the remote code is self-contained: it imports torch, transformers and its sibling, never nanopipe
    for name in ("modeling_nanopipe.py", "configuration_nanopipe.py"):
        tree = ast.parse((out / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] if not n.level else "." for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom)}
        assert imported <= {"__future__", "torch", "transformers", "."}, (name, imported)
    assert checks["verify_max_abs_logit_diff"] <= 1e-4 and checks["verify_chat_template"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp dir left behind


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 32), (2, 33), (2, SEQ), (1, 3 * SEQ)])
def test_logits_equal_ours(exported, model, B, T):
    """Random token batches, fp32: within the short window (32), just past it, the full context, and
    three contexts long (past every window, far along the rotary tables)."""
    _, _, hf_model, _ = exported
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(B * 1000 + T))
    diff = compare_logits(model, hf_model, ids)
    assert diff <= 1e-5, diff


def test_labels_give_our_loss(exported, model):
    _, _, hf_model, _ = exported
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())  # nanopipe: targets are the next tokens
        theirs = hf_model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


PROMPTS = ["Hello there", "What is your name?", "def f(x):", "naïve"]


def test_greedy_generate_equals_engine(exported, model, tok):
    """generate() with transformers' DynamicCache vs our Engine's KV cache: the same tokens, including
    past the trained context (the prompt + 80 new tokens > 64)."""
    _, _, hf_model, _ = exported
    engine = Engine(model, tok)
    compared = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, prepend="<|bos|>")
        rows, masks, _ = engine.generate_rows(ids, max_tokens=80, temperature=0, keep_stop=True)
        assert all(masks[0][len(ids):]), "the calculator fired: forced tokens are not a model's output"
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=80, do_sample=False)[0].tolist()
        assert out[len(ids):] == rows[0][len(ids):], prompt
        compared += len(out) - len(ids)
    assert compared == 4 * 80


def test_left_padded_batch_generates_as_single_prompts(exported):
    """Padding: masked keys, positions counted over real tokens only, so each row decodes as if alone."""
    _, _, hf_model, hf_tok = exported
    hf_tok.padding_side = "left"
    batch = hf_tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    out = hf_model.generate(**batch, max_new_tokens=20, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        single = hf_model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out[i, width:width + len(single)].tolist() == single, prompt


def test_tokenizer_fuzz_gives_our_ids(exported, tok):
    _, _, _, hf_tok = exported
    rng = random.Random(0)
    texts = [fuzz_text(rng) for _ in range(3000)]
    for text in texts:
        ours = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf_tok.decode(ours) == tok.decode(ours)
    # the default call puts <|bos|> first, as every nanopipe model input starts
    assert hf_tok("hello world")["input_ids"] == tok.encode("hello world", prepend="<|bos|>")
    for name in ["<|bos|>", "<|user_start|>", "<|assistant_end|>", "<|python_start|>", "<|output_end|>"]:
        assert hf_tok.convert_tokens_to_ids(name) == tok.encode_special(name)
    assert hf_tok.bos_token == "<|bos|>" and hf_tok.eos_token == "<|assistant_end|>" and hf_tok.pad_token == "<|bos|>"


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_renders_as_ours(exported, tok, i):
    _, _, _, hf_tok = exported
    conversation = CONVERSATIONS[i]
    ids, _ = tok.render_conversation(conversation, max_tokens=10**6)
    assert hf_tok.apply_chat_template(conversation["messages"], tokenize=True) == ids
    # the generation prompt: everything before the last assistant reply, then <|assistant_start|>
    prompt = hf_tok.apply_chat_template(conversation["messages"][:-1], tokenize=True, add_generation_prompt=True)
    assert prompt == tok.render_for_completion(conversation)


def test_chat_template_refuses_what_our_renderer_refuses(exported):
    from jinja2.exceptions import TemplateError

    _, _, _, hf_tok = exported
    for messages in ([{"role": "assistant", "content": "I speak first"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
                     [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]):
        with pytest.raises(TemplateError):
            hf_tok.apply_chat_template(messages, tokenize=False)


def test_import_back_is_bit_exact(exported, model, tok):
    out, _, _, _ = exported
    back, back_tok, provenance = load_exported(out)
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert back_tok.to_json() == tok.to_json()
    assert provenance["source"] == "sft" and provenance["step"] == 7
    ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


# -----------------------------------------------------------------------------
# What must not be published, and inputs that are not what they claim to be


def test_export_that_does_not_reproduce_the_model_is_never_published(tmp_path, tok):
    """A bf16 model computes other logits than its fp32 export: verification fails, and the previous
    export stays in place untouched (the new one never left its temp directory)."""
    out = tmp_path / "hf"
    export_model(tiny_model(seed=1), tok, out, eos_token="<|bos|>", provenance={"source": "base"}, card="old\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="logits differ from nanopipe's"):
        export_model(tiny_model(seed=2).to(torch.bfloat16), tok, out, eos_token="<|bos|>",
                     provenance={"source": "base"}, card="new\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_verify_names_the_mismatch(exported, tok):
    out, _, _, _ = exported
    with pytest.raises(ExportError, match="logits differ"):
        verify_export(out, tiny_model(seed=9), tok)


def test_tokenizer_of_another_vocab_is_refused(tmp_path, tok):
    with pytest.raises(ExportError, match="tokenizer has 512 tokens but the model's vocab_size is 600"):
        export_model(tiny_model(vocab_size=600), tok, tmp_path / "hf", eos_token="<|bos|>", provenance={}, card="")
    assert not (tmp_path / "hf").exists()


def test_import_refuses_another_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"config.json: model_type 'gpt2' .* is not a nanopipe export"):
        load_exported(tmp_path)


def test_import_names_a_missing_tokenizer_and_missing_weights(tmp_path, exported):
    out, _, _, _ = exported
    import shutil

    broken = tmp_path / "hf"
    shutil.copytree(out, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"hf/tokenizer.json: missing"):
        load_exported(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"hf/model.safetensors: missing"):
        load_exported(broken)
