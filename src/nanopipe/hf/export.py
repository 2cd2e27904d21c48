"""Export a nanopipe checkpoint as a Hugging Face model directory, verify it, and import it back.

    models/hf/
      model.safetensors          the state dict, fp32, under nanopipe's own parameter names
      config.json                NanopipeConfig (+ auto_map for trust_remote_code)
      generation_config.json     bos / eos / pad ids (generation stops where the Engine stops)
      configuration_nanopipe.py  the config class  } copied from this package: the architecture,
      modeling_nanopipe.py       the model class   } self-contained (torch + transformers only)
      tokenizer.json, tokenizer_config.json, special_tokens_map.json   fast tokenizer + chat template
      nanopipe.json              provenance: source checkpoint, step, model_config, versions
      README.md                  the model card

`export_model` writes the directory atomically and, before it is renamed into place, loads it
with `transformers` (AutoModelForCausalLM / AutoTokenizer, trust_remote_code) and checks logits,
tokenization and chat rendering against our own model and tokenizer: a directory that does not
reproduce the model is never published. `load_exported` reads an export back into our GPT and
Tokenizer, bit for bit.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from nanopipe.artifacts import atomic_dir, read_json
from nanopipe.hf import configuration_nanopipe, modeling_nanopipe
from nanopipe.hf.tokenizer import CHAT_TEMPLATE, from_hf_dir, to_hf_files
from nanopipe.model.gpt import GPT, ROPE_BASE, SOFTCAP, VE_GATE_CHANNELS, GPTConfig

log = logging.getLogger("nanopipe.hf")

WEIGHTS_FILE, CONFIG_FILE, GENERATION_FILE = "model.safetensors", "config.json", "generation_config.json"
PROVENANCE_FILE, CARD_FILE = "nanopipe.json", "README.md"
MODEL_TYPE = "nanopipe"
ROTARY_LEN_FACTOR = 10  # GPT.rotary_seq_len = sequence_len * 10
EXPORT_FORMAT = 1
# fp32 logits of the same weights through two implementations of the same ops: equal up to the
# order of floating-point reductions (measured 0 on CPU; a few 1e-6 is still the same model).
VERIFY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export cannot be written, or does not reproduce the model, or is not a nanopipe export."""


# -----------------------------------------------------------------------------
# Export


def hf_config(config: GPTConfig, padded_vocab_size: int, tokenizer, eos_token: str):
    """The NanopipeConfig of a GPT: our fields, the constants our forward uses, token ids, auto_map."""
    bos, eos = tokenizer.get_bos_token_id(), tokenizer.encode_special(eos_token)
    return configuration_nanopipe.NanopipeConfig(
        vocab_size=config.vocab_size, padded_vocab_size=padded_vocab_size, n_layer=config.n_layer,
        n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd, sequence_len=config.sequence_len,
        window_pattern=config.window_pattern, rotary_base=float(ROPE_BASE), rotary_len_factor=ROTARY_LEN_FACTOR,
        softcap=SOFTCAP, ve_gate_channels=VE_GATE_CHANNELS, bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
        architectures=["NanopipeForCausalLM"], dtype="float32",
        auto_map={"AutoConfig": "configuration_nanopipe.NanopipeConfig",
                  "AutoModelForCausalLM": "modeling_nanopipe.NanopipeForCausalLM"},
    )


def generation_config(tokenizer) -> dict:
    """The Engine stops a reply at <|assistant_end|> and a document at <|bos|>: both end generate()."""
    bos = tokenizer.get_bos_token_id()
    return {"bos_token_id": bos, "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos],
            "pad_token_id": bos}


def export_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the state dict (bf16 embeddings of a CUDA run are upcast exactly)."""
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in model.state_dict().items()}


def export_model(model: GPT, tokenizer, out_dir, *, eos_token: str, provenance: dict, card: str,
                 verify: bool = True) -> dict:
    """Write the Hugging Face directory for `model` + `tokenizer` to `out_dir` (replaced atomically).

    eos_token: <|assistant_end|> for a chat model, <|bos|> for a base model. provenance: JSON-able
    facts for nanopipe.json (source, step, ...). card: README.md text. With verify, the directory is
    loaded with transformers before it is published and the checks' numbers are returned.
    """
    from safetensors.torch import save_file

    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ExportError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}: they are not from the same run")
    out_dir = Path(out_dir)
    config = hf_config(model.config, model.padded_vocab_size, tokenizer, eos_token)
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)  # config.json
        save_file(export_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt", "producer": "nanopipe"})
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)  # safetensors writes it 0600
        (tmp / GENERATION_FILE).write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n", encoding="utf-8")
        for module in (configuration_nanopipe, modeling_nanopipe):
            src = Path(inspect.getsourcefile(module))
            (tmp / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        for name, text in to_hf_files(tokenizer, eos_token, model.config.sequence_len).items():
            (tmp / name).write_text(text, encoding="utf-8")
        prov = {"format": EXPORT_FORMAT, **provenance, "model_config": asdict(model.config)}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        checks = verify_export(tmp, model, tokenizer) if verify else {}
    log.info("exported %s to %s", provenance.get("source", "model"), out_dir)
    return checks


# -----------------------------------------------------------------------------
# Verification: the directory as transformers sees it


# (no special-token text: a fast tokenizer turns "<|bos|>" typed in text into the token; see tokenizer.py)
VERIFY_TEXTS = ["The capital of France is Paris.", "  indented\n\tcode = [1, 22, 333]\n", "naïve café: 東京 🚀 ½",
                "It's 3:45pm;  they'll say \"héllo\"\r\n\n", ""]
VERIFY_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How many r in 'strawberry'?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me count:"},
                                      {"type": "python", "text": "'strawberry'.count('r')"},
                                      {"type": "python_output", "text": "3"}, {"type": "text", "text": "\n#### 3"}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def load_hf(hf_dir, dtype=torch.float32):
    """(model, tokenizer) through transformers' Auto classes, as any user loads the export (a local
    directory: nothing is fetched, the modeling code is the directory's own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(hf_dir))


@torch.no_grad()
def compare_logits(ours: GPT, theirs, ids: torch.Tensor) -> float:
    """Max |logit difference| between our model and the transformers model on token ids (B, T)."""
    with torch.autocast("cpu", enabled=False):
        a = ours(ids)
        b = theirs(input_ids=ids).logits
    if a.shape != b.shape:
        raise ExportError(f"logits shapes differ: nanopipe {tuple(a.shape)}, transformers {tuple(b.shape)}")
    return (a - b).abs().max().item()


def verify_export(hf_dir, model: GPT, tokenizer) -> dict:
    """Load `hf_dir` with transformers; compare logits on random tokens (a batch within the short
    window, and one sequence of the full context, past every window), tokenization of sample
    texts, and the chat template. Raises ExportError naming the first check that fails."""
    hf_model, hf_tok = load_hf(hf_dir)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    V, T = model.config.vocab_size, model.config.sequence_len
    short = torch.randint(0, V, (2, min(T // 2, 64)), generator=gen)
    full = torch.randint(0, V, (1, T), generator=gen)
    try:
        diff = max(compare_logits(model, hf_model, short), compare_logits(model, hf_model, full))
    finally:
        model.train(was_training)
    if not diff <= VERIFY_TOLERANCE:  # also catches nan
        raise ExportError(f"{hf_dir}: transformers' logits differ from nanopipe's by {diff:.3g} "
                          f"(tolerance {VERIFY_TOLERANCE}); the export does not reproduce the model")
    for text in VERIFY_TEXTS:
        ours, theirs = tokenizer.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ExportError(f"{hf_dir}: tokenizer.json encodes {text!r} as {theirs[:12]}..., nanopipe as {ours[:12]}...")
    ours = tokenizer.render_conversation(VERIFY_CONVERSATION, max_tokens=1 << 30)[0]
    theirs = hf_tok.apply_chat_template(VERIFY_CONVERSATION["messages"], tokenize=True)
    if list(theirs) != ours:
        raise ExportError(f"{hf_dir}: the chat template renders {hf_tok.decode(theirs)!r}, "
                          f"nanopipe renders {tokenizer.decode(ours)!r}")
    if hf_tok.chat_template != CHAT_TEMPLATE:
        raise ExportError(f"{hf_dir}: tokenizer_config.json's chat_template is not nanopipe's")
    return {"verify_max_abs_logit_diff": diff, "verify_tokens": int(short.numel() + full.numel()),
            "verify_texts": len(VERIFY_TEXTS), "verify_chat_template": True}


# -----------------------------------------------------------------------------
# Import: an export back into nanopipe


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; {hf_dir} is not a Hugging Face model directory")
    cfg = read_json(path)
    if cfg.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{path}: model_type {cfg.get('model_type')!r} (architectures {cfg.get('architectures')}) "
                          f"is not a nanopipe export ({MODEL_TYPE!r}); evaluate an outside model with "
                          f"`nanopipe base_eval --hf-path {hf_dir}` instead")
    return cfg


def gpt_config_of(cfg: dict, where: str = CONFIG_FILE) -> GPTConfig:
    """Our GPTConfig from an export's config.json; the baked-in constants must be ours."""
    ours = {"softcap": SOFTCAP, "rotary_base": float(ROPE_BASE), "ve_gate_channels": VE_GATE_CHANNELS,
            "rotary_len_factor": ROTARY_LEN_FACTOR}
    for key, value in ours.items():
        if key in cfg and not math.isclose(float(cfg[key]), float(value)):
            raise ExportError(f"{where}: {key} = {cfg[key]} but nanopipe's GPT uses {value}; this GPT cannot load it")
    try:
        config = GPTConfig(sequence_len=int(cfg["sequence_len"]), vocab_size=int(cfg["vocab_size"]),
                           n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_kv_head=int(cfg["n_kv_head"]),
                           n_embd=int(cfg["n_embd"]), window_pattern=str(cfg["window_pattern"]))
    except KeyError as e:
        raise ExportError(f"{where}: missing key {e}") from None
    return config


def load_exported(hf_dir, device="cpu", phase: str = "eval"):
    """(GPT, Tokenizer, provenance) from an export directory: the weights exactly as written."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config = gpt_config_of(_read_config(hf_dir), str(hf_dir / CONFIG_FILE))
    weights = hf_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights}: missing; the export is incomplete")
    sd = load_file(str(weights), device=str(device))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary tables (not saved)
    if model.padded_vocab_size != sd.get("lm_head.weight", torch.empty(0)).shape[0]:
        raise ExportError(f"{weights}: lm_head has {tuple(sd['lm_head.weight'].shape) if 'lm_head.weight' in sd else 'no'} "
                          f"rows, nanopipe pads vocab {config.vocab_size} to {model.padded_vocab_size}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{weights}: does not match {CONFIG_FILE}: {e}") from e
    model.train() if phase == "train" else model.eval()
    tokenizer = from_hf_dir(hf_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ExportError(f"{hf_dir}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, config.json's "
                          f"vocab_size is {config.vocab_size}")
    prov_path = hf_dir / PROVENANCE_FILE
    provenance = read_json(prov_path) if prov_path.is_file() else {}
    return model, tokenizer, provenance
