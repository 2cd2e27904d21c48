"""Tiny models and batches shared by the model tests (depth 2, dim 64, vocab 256)."""
import torch

from nanopipe.model.gpt import GPTConfig, create_model

VOCAB = 256
SEQ = 16


def tiny_config(**kw) -> GPTConfig:
    cfg = dict(sequence_len=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    cfg.update(kw)
    return GPTConfig(**cfg)


def tiny_model(seed: int = 0, perturb: bool = False, double: bool = False, **kw):
    """perturb: give the zero-initialised output projections small random weights. At the real init
    the lambdas get an exactly-zero gradient (RMSNorm makes the output invariant to their common
    scale), and AdamW with eps=1e-10 turns float noise in that zero into a full +-lr step, which
    makes two correct implementations disagree. Comparisons between implementations use perturb.
    double: float64 weights (the rotary tables stay bf16), so that comparisons of two reduction
    orders (1 process vs 2 ranks) are not swamped by Adam amplifying fp32 rounding."""
    torch.manual_seed(seed)
    model = create_model(tiny_config(**kw), "cpu")
    if perturb:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for block in model.transformer.h:
                for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    if double:
        cos, sin = model.cos, model.sin
        model.double()
        model.cos, model.sin = cos, sin
    return model


def batch(seed: int = 1, B: int = 4, T: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, T), generator=g)
    y = torch.randint(0, VOCAB, (B, T), generator=g)
    return x, y


def schedule(optimizer, step: int, total: int = 10) -> None:
    """What the pretrain loop does between steps, with the real functions it calls (nanopipe.stages.pretrain):
    the LR multiplier (here no warmup and a warmdown over all `total` steps to 0: 1 - step / total),
    Muon's momentum ramp and the weight decay 0.1 x (1 - step / total)."""
    from nanopipe.train.schedules import apply_schedule, lr_multiplier, muon_momentum

    apply_schedule(optimizer, lr_multiplier(step, total, 0.0, 1.0, 0.0), muon_momentum(step), 0.1 * (1 - step / total))


def train_steps(model, optimizer, steps: int, start: int = 0, next_batch=None) -> list[float]:
    """`steps` scheduled optimizer steps; returns the losses. next_batch() gives each step's
    (x, y); by default every step trains on the same `batch()`."""
    fixed = batch() if next_batch is None else None
    losses = []
    for step in range(start, start + steps):
        x, y = fixed if next_batch is None else next_batch()
        schedule(optimizer, step)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
