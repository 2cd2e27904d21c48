"""The GPT model, as nanochat's (nanochat nanochat/gpt.py @1ec0a34).

- rotary embeddings (base 10000, half-split), no positional table;
- QK-norm after RoPE; parameter-free RMSNorm everywhere (no learnable weights);
- untied wte / lm_head, no biases; vocab padded to a multiple of 64;
- ReLU^2 MLP with 4x hidden;
- value embeddings on alternating layers (the last always), mixed into V by 2*sigmoid gates;
- per-layer resid_lambdas / x0_lambdas mixing the stream with the first normed embedding;
- sliding-window pattern of S (half context) / L (full), final layer forced L;
- logits soft-capped at 15 in fp32.

Typical use:
    config = config_from_depth(depth=4, vocab_size=4096, sequence_len=256)
    model = create_model(config, device)        # meta-device build, to_empty, init_weights
    optimizer = model.setup_optimizer(...)      # MuonAdamW or DistMuonAdamW by world size
    loss = model(idx, targets)                  # idx/targets (B, T) int64, -1 = ignore
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanopipe.model.attention import flash_attn
from nanopipe.model.fused_ce import linear_softcap_cross_entropy
from nanopipe.model.optim import DistMuonAdamW, MuonAdamW
from nanopipe.runtime import print0

SOFTCAP = 15.0
VE_GATE_CHANNELS = 32
ROPE_BASE = 10000


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6        # query heads
    n_kv_head: int = 6     # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"


def config_from_depth(depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64,
                      head_dim: int = 128, window_pattern: str = "SSSL", n_kv_head: int | None = None) -> GPTConfig:
    """nanochat's build_model_meta: model_dim = depth*aspect_ratio rounded UP to a multiple of
    head_dim, so every head is exactly head_dim wide; n_kv_head defaults to n_head (no GQA)."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"need depth>=1, aspect_ratio>=1 and an even head_dim>=2; got depth={depth}, "
                         f"aspect_ratio={aspect_ratio}, head_dim={head_dim}")
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=model_dim, window_pattern=window_pattern)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, counted back from the last one (which always has one)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    assert x.ndim == 4  # (B, T, H, D)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0, \
            f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = VE_GATE_CHANNELS
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer, arXiv 2410.17897): a per-layer token embedding added to V.
            # Lots of capacity for almost no FLOPs; the input-dependent per-head gate helped upstream.
            # Gate in (0, 2), neutral (1) at init since the gate weights start at zero.
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size,
                                                   per_row=kv_cache.per_row and B > 1)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)  # once per forward, after every layer wrote at the same position
        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


class _ReluSquared(torch.autograd.Function):
    """relu(u)^2 saving only relu(u): backward is one fused 2*h*grad instead of autograd's pow and
    threshold backwards (each a full pass over the 4x-wide hidden). Bit-identical to the plain ops."""

    @staticmethod
    def forward(ctx, u):
        h = torch.relu(u)
        ctx.save_for_backward(h)
        return h.square()

    @staticmethod
    def backward(ctx, grad):
        h, = ctx.saved_tensors
        return grad.mul(h).mul_(2)


def relu_squared(u):
    # torch.compile traces the plain ops better than a custom Function; eager runs the Function
    return F.relu(u).square() if torch.compiler.is_compiling() else _ReluSquared.apply(u)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, pad_vocab_size_to: int = 64):
        """Build under `with torch.device("meta"):` then `to_empty(device=...)` and `init_weights()`
        (or call `create_model`): the constructor's values are placeholders."""
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        # Padded to a multiple of 64 for efficiency (matmul shapes, rows that shard evenly across
        # ranks); the extra logits are sliced off in forward, so they never get probability.
        padded_vocab_size = math.ceil(config.vocab_size / pad_vocab_size_to) * pad_vocab_size_to
        if padded_vocab_size != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {padded_vocab_size} for efficiency")
        self.padded_vocab_size = padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, padded_vocab_size, bias=False)
        # Learnable per-layer scalars (from modded-nanogpt): resid_lambdas scale the residual
        # stream, x0_lambdas blend the normed input embedding back in (a direct path from the
        # tokens to deep layers). Separate parameters so the optimizer can treat them apart.
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        # Alternating layers (last always) worked better upstream than a few VEs or one per layer.
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded_vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        # 10x the training context so generation can run past it; never saved in checkpoints.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Write every parameter and buffer (call after to_empty)."""
        # wte std 1: the forward RMS-normalises the looked-up rows, so no 1/sqrt(C) scaling is needed.
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        # lm_head tiny: initial logits ~0, i.e. near-uniform predictions (loss starts near ln V).
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Matrices: uniform rather than normal (no outliers), bound sqrt(3)/sqrt(C) so std = 1/sqrt(C).
        s = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)  # residual branches start as identity
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        self.resid_lambdas.fill_(1.0)  # plain residual connections at init
        self.x0_lambdas.fill_(0.1)     # a small initial weight on the skip to the input embedding
        for ve in self.value_embeds.values():  # like c_v: uniform, same std
            torch.nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        # On CUDA the big lookup tables are stored in bf16 (memory); matrices stay fp32 under autocast.
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=ROPE_BASE, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @staticmethod
    def _compute_window_sizes(config: GPTConfig):
        pattern = config.window_pattern.upper()
        if not pattern or not all(c in "SL" for c in pattern):
            raise ValueError(f"Invalid window_pattern: {config.window_pattern!r}. Use only S and L.")
        long_window = config.sequence_len
        short_window = long_window // 2
        char_to_window = {"L": (long_window, 0), "S": (short_window, 0)}
        window_sizes = [char_to_window[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        window_sizes[-1] = (long_window, 0)  # the final layer always sees the full context
        return window_sizes

    def get_device(self):
        return self.transformer.wte.weight.device

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward): 6 x non-embedding params (lm_head
        included) + 12*H*D*window per layer for the attention score/value matmuls."""
        nparams = sum(p.numel() for p in self.parameters())
        value_embeds_numel = sum(ve.weight.numel() for ve in self.value_embeds.values())
        nparams_exclude = (self.transformer.wte.weight.numel() + value_embeds_numel
                           + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = 0
        for window_size in self.window_sizes:
            window = window_size[0]
            effective_seq = t if window < 0 else min(window, t)
            attn_flops += 12 * h * q * effective_seq
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self) -> dict:
        """Parameter counts per group; scaling params (base_train) = transformer_matrices + lm_head."""
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        assert total == sum(p.numel() for p in self.parameters()), "Parameter count mismatch"
        return {"wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
                "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total}

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5, distributed: bool | None = None,
                        compile: bool | None = None):
        """Five AdamW groups (lm_head, wte, value embeds, resid lambdas, x0 lambdas) plus one Muon
        group per distinct matrix shape (sorted). AdamW LRs for lm_head/wte/VE are scaled by
        (C/768)^-0.5. Every group gets group['initial_lr'] = group['lr'] for schedules.

        Returns DistMuonAdamW when a process group with world size > 1 is initialised (or when
        distributed=True), else MuonAdamW. compile: torch.compile the update kernels (default:
        on when the params are on CUDA).
        """
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        resid_params = [self.resid_lambdas]
        x0_params = [self.x0_lambdas]
        assert len(list(self.parameters())) == (len(matrix_params) + len(embedding_params) + len(lm_head_params)
                                                + len(value_embeds_params) + len(resid_params) + len(x0_params))
        # AdamW LRs were tuned at width 768; scale them by 1/sqrt(width/768) for other widths.
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adam = dict(kind="adamw", betas=tuple(adam_betas), eps=1e-10, weight_decay=0.0)
        # Muon is for the 2-D hidden-layer matrices; the unembedding, the embedding tables (token
        # lookups, not hidden linear maps) and the scalars get AdamW, as in modded-nanogpt.
        param_groups = [
            dict(adam, params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(adam, params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale),
            # resid_lambdas multiply the stream and compound through the layers: ~100x smaller LR
            # than the additive x0_lambdas, whose higher beta1 (0.96) came out of an upstream sweep.
            dict(adam, params=resid_params, lr=scalar_lr * 0.01),
            dict(adam, params=x0_params, lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        # One Muon group per shape: its matrices are stacked and updated by one fused kernel.
        for shape in sorted({tuple(p.shape) for p in matrix_params}):
            group_params = [p for p in matrix_params if tuple(p.shape) == shape]
            param_groups.append(dict(kind="muon", params=group_params, lr=matrix_lr, momentum=0.95, ns_steps=5,
                                     beta2=0.95, weight_decay=weight_decay))
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        Factory = DistMuonAdamW if distributed else MuonAdamW
        optimizer = Factory(param_groups, compile=compile)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) int64. With targets (B, T) (-1 = ignore): the cross-entropy, a scalar for
        'mean' or (B*T,) for 'none'. Without: fp32 logits (B, T, vocab_size)."""
        B, T = idx.size()
        assert T <= self.cos.size(1), f"Sequence length grew beyond the rotary embeddings cache: {T} > {self.cos.size(1)}"
        assert idx.device == self.cos.device, f"Rotary embeddings and idx are on different devices: {idx.device} != {self.cos.device}"
        assert self.cos.dtype == torch.bfloat16, "Rotary embeddings must be in bfloat16"
        dtype = self.rotary_dtype(idx.device.type)
        if kv_cache is not None and kv_cache.per_row and B > 1:
            # rows at their own positions (the serving scheduler, D14): row b's token t is at
            # cache_seqlens[b] + t; a one-row cache takes the shared path below (same arithmetic)
            pos = kv_cache.cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            cos_sin = self.cos[0, pos].to(dtype), self.sin[0, pos].to(dtype)  # (B, T, 1, D/2)
        else:
            T0 = 0 if kv_cache is None else kv_cache.get_pos()
            assert T0 + T <= self.cos.size(1), f"KV-cache position {T0}+{T} beyond the rotary cache ({self.cos.size(1)})"
            cos_sin = self.cos[:, T0:T0 + T].to(dtype), self.sin[:, T0:T0 + T].to(dtype)
        x = norm(self.transformer.wte(idx))
        x0 = x  # the normed embedding, mixed back into every layer (x0_lambdas)
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
        x = norm(x)
        if targets is not None and self._use_fused_ce(loss_reduction):
            autocast = torch.is_autocast_enabled("cpu")
            return linear_softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.view(-1),
                                                self.config.vocab_size, SOFTCAP, loss_reduction,
                                                torch.get_autocast_dtype("cpu") if autocast else None)
        logits = self.lm_head(x)
        logits = logits[..., :self.config.vocab_size].float()
        # Soft-cap: squash smoothly into (-15, 15) so no logit can grow without bound; near-identity
        # for small logits. In fp32, like the loss.
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                                   reduction=loss_reduction)
        return logits

    def rotary_dtype(self, device_type: str) -> torch.dtype:
        """The dtype q/k reach the rotary in (autocast's, else the weights'). The tables are stored
        bf16 (nanochat); casting them once per forward saves a promotion in every layer."""
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.lm_head.weight.dtype

    def _use_fused_ce(self, reduction: str) -> bool:
        # CPU only: on GPU, torch.compile fuses the plain path (nanochat's). Per-token losses with
        # gradients (RL) need the logits graph.
        return (self.lm_head.weight.device.type == "cpu" and not torch.compiler.is_compiling()
                and (reduction == "mean" or not torch.is_grad_enabled()))

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive reference sampler: batch 1, no KV cache (re-runs the whole prefix each step).
        Yields token ids (ints). temperature 0 = greedy."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_ids), dim=1)
            yield next_ids.item()


def create_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device (no memory), allocate on `device`, initialise."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model, dynamic=False) when enabled (training shapes never change), else the
    model itself. Keep the uncompiled model for saving, sampling and variable-shape evaluation."""
    if not enabled:
        return model
    device_type = next(model.parameters()).device.type
    if device_type == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        raise RuntimeError("torch.compile on CPU needs a C compiler (cc/gcc) on PATH; install one or set compile=false")
    return torch.compile(model, dynamic=False)
