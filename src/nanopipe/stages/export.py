"""The `export` stage: the chat model (or any checkpoint, `export.source`) as a Hugging Face model,
models/hf, that `transformers` loads offline and that lm-evaluation-harness evaluates.

It writes the weights (safetensors, fp32), config.json + generation_config.json, the architecture as
`trust_remote_code` modules, a fast tokenizer with our ids and a chat template rendering as ours,
provenance (nanopipe.json) and a model card built from the run's metrics (nanopipe.hf). With
`export.verify` the directory is loaded through transformers' Auto classes before it is published,
and logits, tokenization and chat rendering are compared with ours; metrics/export.json records the
numbers. The export runs on the CPU in fp32 whatever the training device was.

The export is also logged with its MLflow run as a pyfunc model, `chat_model` (nanopipe.hf.mlflow_chat:
`mlflow.pyfunc.load_model(uri).predict(["Hi!"])` replies), here rather than in chat_eval or report:
this stage holds the final chat model in a form that loads without nanopipe, already verified
(docs/decisions.md D19).
`export.log_weights=false` (big models: weights left to DVC) logs neither the weights nor the model.
"""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from nanopipe import __version__, artifacts, paths
from nanopipe.hf.card import model_card
from nanopipe.hf.export import WEIGHTS_FILE, export_model
from nanopipe.model.checkpoint import checkpoint_at, load_model, read_meta
from nanopipe.stage import Stage
from nanopipe.tokenizer import load_tokenizer
from nanopipe.tracking import git_commit

log = logging.getLogger("nanopipe.export")

PARAMS = ["export"]
MLFLOW_MODEL = Path(__file__).resolve().parents[1] / "hf" / "mlflow_chat.py"  # logged as code, not imported
CARD_METRICS = ("pretrain", "base_eval", "sft", "rl", "chat_eval")  # the model card's numbers (dvc.yaml deps)


def run(st: Stage) -> None:
    c = st.cfg.export
    tokenizer = load_tokenizer(paths.TOKENIZER)
    ckpt = checkpoint_at(paths.CHECKPOINTS[c.source], c.step, "export.step")
    model, meta = load_model(ckpt, "cpu", "eval", tokenizer=tokenizer)
    step = meta.get("step")
    metrics = {s: artifacts.read_json(paths.metrics_file(s)) for s in CARD_METRICS if paths.metrics_file(s).exists()}
    name = c.name or f"nanopipe-d{model.config.n_layer}-{c.source}"
    commit = git_commit()
    num_params = sum(p.numel() for p in model.parameters())
    card = model_card(name=name, source=c.source, step=step, config=model.config, num_params=num_params,
                      metrics=metrics, git_commit=commit, hf_dir=str(paths.HF_EXPORT))
    provenance = {
        "name": name, "source": c.source, "step": step, "checkpoint": str(ckpt), "git_commit": commit,
        "checkpoint_sha256": read_meta(ckpt)["files"]["model.pt"]["sha256"],
        "tokenizer_sha256": artifacts.sha256_file(paths.TOKENIZER / "tokenizer.json"),
        "nanopipe": __version__,
        "transformers": importlib.metadata.version("transformers"),
    }
    # a base model's documents end where the next <|bos|> begins; a chat reply ends at <|assistant_end|>
    eos = "<|bos|>" if c.source == "base" else "<|assistant_end|>"
    checks = export_model(model, tokenizer, paths.HF_EXPORT, eos_token=eos, provenance=provenance, card=card,
                          verify=c.verify)
    size = (paths.HF_EXPORT / WEIGHTS_FILE).stat().st_size
    # MLflow: the shareable model is an artifact of the run that produced it (`mlflow ui` shows which
    # run made which models/hf), tagged with where it came from.
    st.tracker.log_dir(paths.HF_EXPORT, "hf_model", exclude=() if c.log_weights else (WEIGHTS_FILE,))
    st.tracker.set_tags({"hf_model": str(paths.HF_EXPORT), "hf_source": c.source, "hf_step": step,
                         "hf_name": name, "hf_checkpoint_sha256": provenance["checkpoint_sha256"]})
    model_uri = st.tracker.log_pyfunc(
        "chat_model", MLFLOW_MODEL, {"hf": str(paths.HF_EXPORT)}, inputs=[(None, "string")],
        params=[("max_new_tokens", "long", 128), ("temperature", "double", 0.0), ("top_k", "long", 50)],
        pip_requirements=[f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in ("mlflow", "torch", "transformers")],
    ) if c.log_weights else None
    if model_uri:
        st.tracker.set_tags({"mlflow_model": model_uri})
    out = {"source": c.source, "step": step, "name": name, "num_params": num_params, "weights_bytes": size,
           "verified": bool(checks), **checks}
    report = [f"- `{paths.HF_EXPORT}`: {name}, from `models/{c.source}` at step {step} ({num_params:,} parameters, "
              f"{size / 2**20:.1f} MiB of fp32 safetensors)",
              f"- eos token `{eos}`; chat template and tokenizer.json with nanopipe's ids"]
    if checks:
        report.append(f"- verified through transformers (trust_remote_code): max |logit diff| "
                      f"{checks['verify_max_abs_logit_diff']:.3g} over {checks['verify_tokens']} random tokens, "
                      f"{checks['verify_texts']} texts tokenized identically, chat template equal to ours")
    else:
        report.append("- not verified (export.verify=false)")
    if model_uri:
        report.append(f"- MLflow: the pyfunc model `chat_model` of the export run, `mlflow.pyfunc.load_model(\"{model_uri}\")"
                      ".predict([\"Hi!\"])` replies")
    st.finish(out, "\n".join(report))
