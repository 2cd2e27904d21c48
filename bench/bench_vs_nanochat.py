"""Val bpb of nanopipe's GPT + MuonAdamW against upstream nanochat's, at equal tokens and equal
hyperparameters: same shards, tokenizer, loader, init seed, LRs, schedules and evaluation; fp32 on
CPU (nanochat's CPU precision). Needs a finished `dvc repro` of download and tokenizer, and
nanochat's gpt.py / optim.py: assembled from the team's code walkthrough (--walkthrough, the
"# file path:" sections of ../shared/seed), whose one gap (adamw_step_fused's body) is written
from its description. Variants, each in a fresh process:

- nanochat:        upstream model + optimizer (its torch.compile'd optimizer kernels)
- nanopipe-plain:  ours, with nanochat's logits path (the same floating-point reduction order)
- nanopipe:        ours as the stages run it (chunked lm_head + soft-cap + CE on CPU)

    python bench/bench_vs_nanochat.py [--steps 300] [--walkthrough ../shared/seed/000_*.txt]

Measured (2-core dev machine, 300 steps = 614k tokens of the tiny preset's model, d4 / seq 256 /
batch 8 / vocab 4096): nanochat 1.3139, nanopipe-plain 1.3123 (eager nanochat kernels: 1.3122),
nanopipe 1.2900 (seed 43: 1.2881). The plain path matches upstream to 0.02%. The chunked path
differs only in rounding, but nanochat's x0_lambdas get a first AdamW step of
lr * g / (|g| + 1e-10) from a gradient that is exactly 0 in exact arithmetic (RMSNorm is scale
invariant while every block output is still 0), i.e. a kick set by rounding noise; the chunked
path's noise is smaller, and so is the kick.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MLP = '''class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())
'''
ADAMW = '''
@torch.compile(dynamic=False, fullgraph=True)
def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    # not in the walkthrough: written from its description (decoupled decay, lerp moments, bias correction)
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-(lr_t / bias1)))
'''


def assemble_nanochat(walkthrough: str, out: Path) -> None:
    """nanochat/{gpt,optim}.py from the walkthrough's code blocks; imports wired to nanopipe's
    dist info and attention (whose SDPA path is nanochat's fallback)."""
    text = Path(walkthrough).read_text()
    sections = re.split(r"^# file path: ", text, flags=re.M)

    def blocks(name):
        found = [s.split("\n", 1)[1].split("\n```", 1)[0] for s in sections if s.startswith(name + "\n")]
        if not found:
            sys.exit(f"{walkthrough}: no '# file path: {name}' sections")
        return found

    def pick(found, start):
        hits = [b for b in found if b.lstrip().startswith(start)]
        if not hits:
            sys.exit(f"{walkthrough}: no section of nanochat code starting with {start!r}")
        return hits[0]

    g = blocks("nanochat/gpt.py")
    gpt = [pick(g, "from functools"), pick(g, "@dataclass"), pick(g, "def norm"), pick(g, "def has_ve"),
           pick(g, "def apply_rotary_emb"), pick(g, "class CausalSelfAttention"), MLP, pick(g, "class Block"),
           pick(g, "class GPT(")]
    o = blocks("nanochat/optim.py")
    optim = [pick(o, "import torch"), ADAMW, pick(o, "polar_express_coeffs"), pick(o, "@torch.compile"),
             pick(o, "class MuonAdamW"), pick(o, "class DistMuonAdamW")]
    pkg = out / "nanochat"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "gpt.py").write_text("\n\n".join(gpt) + "\n")
    (pkg / "optim.py").write_text("\n\n".join(optim) + "\n")
    (pkg / "common.py").write_text("from nanopipe.runtime import get_dist_info, print0\n")
    (pkg / "flash_attention.py").write_text("from nanopipe.model.attention import flash_attn\n")


def run_variant(impl: str, steps: int, seed: int, eval_every: int) -> dict:
    """One training run in this process; returns {step: val_bpb}."""
    import torch
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # as the stages do on CPU
    from nanopipe import paths
    from nanopipe.data.loader import (
        tokenizing_distributed_data_loader_bos_bestfit,
        tokenizing_distributed_data_loader_with_state_bos_bestfit,
    )
    from nanopipe.data.shards import read_manifest, split_paths
    from nanopipe.eval.bpb import evaluate_bpb
    from nanopipe.tokenizer import load_token_bytes, load_tokenizer

    tok, token_bytes = load_tokenizer(paths.TOKENIZER), load_token_bytes(paths.TOKENIZER)
    train, val = split_paths(read_manifest())
    B, T, V, cpu = 8, 256, tok.get_vocab_size(), torch.device("cpu")
    torch.manual_seed(seed)
    if impl == "nanochat":
        from nanochat.gpt import GPT, GPTConfig
        with torch.device("meta"):
            model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, window_pattern="L"))
        model.to_empty(device=cpu)
        model.init_weights()
    else:
        from nanopipe.model.gpt import config_from_depth, create_model
        model = create_model(config_from_depth(4, V, T, aspect_ratio=64, head_dim=64, window_pattern="L"), cpu)
        if impl == "nanopipe-plain":
            type(model)._use_fused_ce = lambda self, reduction: False
    # the tiny preset's LRs (no batch scaling) and base_train's scaled weight decay for this model/batch
    wd = 0.2 * (2048 / 2**19) ** 0.5 * (10.5 * _d12_scaling_params(V, T) / (10.5 * _scaling_params(model)))
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=wd,
                                adam_betas=(0.8, 0.95), scalar_lr=0.5)
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tok, B, T, train, tokenizer_threads=1, device=cpu)
    warmdown = round(0.5 * steps)
    curve = {}
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            vl = tokenizing_distributed_data_loader_bos_bestfit(tok, B, T, [val], device=cpu)
            model.eval()
            curve[step] = evaluate_bpb(model, vl, 32, token_bytes)
            model.train()
            vl.close()
            print(f"{impl} step {step} val bpb {curve[step]:.4f}", file=sys.stderr, flush=True)
        if step == steps:
            break
        x, y, _ = next(loader)
        model(x, y).backward()
        lrm = 1.0 if step <= steps - warmdown else (steps - step) / warmdown  # base_train's schedules
        frac = min(step / 300, 1)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
                group["weight_decay"] = wd * (1 - step / steps)
        opt.step()
        model.zero_grad(set_to_none=True)
    loader.close()
    return curve


def _scaling_params(model) -> int:
    c = model.num_scaling_params()
    return c["transformer_matrices"] + c["lm_head"]


def _d12_scaling_params(V: int, T: int) -> int:
    import torch

    from nanopipe.model.gpt import GPT, config_from_depth
    with torch.device("meta"):
        return _scaling_params(GPT(config_from_depth(12, V, T, aspect_ratio=64, head_dim=64, window_pattern="L")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", nargs="+", default=["nanochat", "nanopipe-plain", "nanopipe"],
                    choices=["nanochat", "nanopipe-plain", "nanopipe"])
    ap.add_argument("--walkthrough", default=None, help="nanochat code walkthrough (default: ../shared/seed/*.txt)")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.environ["NANOCHAT_REF"])
        print(json.dumps(run_variant(args.child, args.steps, args.seed, args.eval_every)))
        return

    walkthrough = args.walkthrough or next(iter(sorted(glob.glob(str(REPO.parent / "shared/seed/*.txt")))), None)
    if "nanochat" in args.variants and not walkthrough:
        sys.exit("no nanochat walkthrough found: pass --walkthrough PATH (or run only --variants nanopipe-plain nanopipe)")
    with tempfile.TemporaryDirectory(prefix="nanochat_ref_") as ref:
        if "nanochat" in args.variants:
            assemble_nanochat(walkthrough, Path(ref))
        results = {}
        for impl in args.variants:
            t0 = time.time()
            p = subprocess.run([sys.executable, __file__, "--child", impl, "--steps", str(args.steps), "--seed", str(args.seed),
                                "--eval-every", str(args.eval_every)], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "NANOCHAT_REF": ref, "OMP_NUM_THREADS": "2"})
            if p.returncode:
                sys.exit(f"{impl} failed:\n{p.stderr[-3000:]}")
            results[impl] = {"curve": {int(k): v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()},
                             "wall_s": round(time.time() - t0, 1)}
    steps = sorted(next(iter(results.values()))["curve"])
    print(f"val bpb, d4 / seq 256 / batch 8 / vocab 4096, fp32 CPU, seed {args.seed}")
    print(f"{'variant':<16}" + "".join(f"{'step ' + str(s):>12}" for s in steps) + f"{'vs first':>10}{'wall s':>9}")
    base = results[args.variants[0]]["curve"][steps[-1]]
    for impl, r in results.items():
        last = r["curve"][steps[-1]]
        print(f"{impl:<16}" + "".join(f"{r['curve'][s]:>12.4f}" for s in steps) + f"{100 * (last / base - 1):>+9.2f}%{r['wall_s']:>9}")
    if args.json:
        from nanopipe.artifacts import write_json
        write_json(args.json, results)


if __name__ == "__main__":
    main()
