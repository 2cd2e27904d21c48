"""A nanopipe GPT as a `transformers` causal LM (shipped with every export for `trust_remote_code`).

This is nanopipe.model.gpt's forward, op for op, so that the exported weights give the same logits
in `transformers` as in nanopipe (the export stage and tests/hf check it):

- rotary embeddings (half-split, base 10000), tables computed in fp32 and stored in bf16 as ours;
- QK-norm after RoPE; parameter-free RMSNorm; untied wte / lm_head; no biases; padded vocab;
- ReLU^2 MLP; value embeddings on alternating layers (the last always) mixed into V by 2*sigmoid gates;
- per-layer resid_lambdas / x0_lambdas mixing the stream with the normed input embedding;
- sliding windows per `window_pattern` (S = half the context, L = all of it, last layer L);
- logits soft-capped (15 * tanh(x / 15)) in fp32.

Self-contained: it imports torch and transformers only, never nanopipe. `transformers`' built-in
NanoChat class implements an older architecture (no value embeddings, lambdas or windows), so it
cannot load these weights faithfully.

Beyond what nanopipe's own forward does, this one understands `transformers`' conventions:
a DynamicCache (so `generate()` works), `attention_mask` with padding (left-padded batches in
`generate()`: padded keys are masked and positions count real tokens only), `position_ids`, and
`labels` (the shifted next-token loss, ignore index -100).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanopipe import NanopipeConfig


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, counted back from the last one (which always has one)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config: NanopipeConfig) -> list[int]:
    """Left window per layer: a query at i sees keys i - w .. i."""
    long_window, short_window = config.sequence_len, config.sequence_len // 2
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"config.json: window_pattern {config.window_pattern!r} must be made of S and L")
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window  # the final layer always sees the full context
    return sizes


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


def attention(q, k, v, window: int, key_mask=None):
    """Causal attention with a left window, q (B, H, Tq, D) aligned with the END of k/v (B, Hkv, Tk, D).

    Without padding this is nanopipe's SDPA path (nanopipe.model.attention) branch for branch, so
    the numbers match: plain causal, a sliced tail for one-token decode, an explicit mask otherwise.
    key_mask (B, Tk) bool marks real (not padding) keys; every query also sees itself, so a padding
    row attends to something and stays finite (its output is never used)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if key_mask is None:
        if window >= Tq and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if Tq == 1:
            if window < Tk:
                start = max(0, Tk - (window + 1))
                k, v = k[:, :, start:], v[:, :, start:]
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
    row = (Tk - Tq) + torch.arange(Tq, device=q.device).unsqueeze(1)
    col = torch.arange(Tk, device=q.device).unsqueeze(0)
    mask = col <= row
    if window < Tk:
        mask = mask & ((row - col) <= window)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :]) | (col == row)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanopipeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, window, cache, key_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # the whole prefix, this step's keys appended
        y = attention(q, k, v, window, key_mask).transpose(1, 2)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: NanopipeConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: NanopipeConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, cache, key_mask):
        x = x + self.attn(norm(x), ve, cos_sin, window, cache, key_mask)
        x = x + self.mlp(norm(x))
        return x


class NanopipePreTrainedModel(PreTrainedModel):
    config_class = NanopipeConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Only reached for weights a checkpoint lacks (a fresh model): nanopipe's init scheme.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            s = 3**0.5 * self.config.n_embd**-0.5
            nn.init.uniform_(module.weight, -s, s)


class NanopipeForCausalLM(NanopipePreTrainedModel, GenerationMixin):
    """Parameter names are nanopipe's state-dict keys, so a checkpoint converts one to one."""

    def __init__(self, config: NanopipeConfig):
        super().__init__(config)
        V, C = config.padded_vocab_size, config.n_embd
        head_dim = C // config.n_head
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, config.n_kv_head * head_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.window_sizes = window_sizes(config)
        # Rotary tables are computed on first use on the input's device (not buffers: from_pretrained
        # builds the model on the meta device, where a buffer computed here would be lost).
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, head_dim/2) in bf16 for positions 0..L-1, L = sequence_len * rotary_len_factor:
        computed exactly as nanopipe computes them (same length, same ops), then stored in bf16."""
        if self._rotary is None or self._rotary[0].device != torch.device(device):
            c = self.config
            head_dim = c.n_embd // c.n_head
            channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
            inv_freq = 1.0 / (c.rotary_base ** (channel_range / head_dim))
            t = torch.arange(c.sequence_len * c.rotary_len_factor, dtype=torch.float32, device=device)
            freqs = torch.outer(t, inv_freq)
            self._rotary = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return self._rotary

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            # value embeddings and the x0 path are lookups by token id: embeddings alone are not enough
            raise ValueError("NanopipeForCausalLM needs input_ids (inputs_embeds are not supported)")
        B, T = input_ids.shape
        # A cache only when one is passed or asked for (generate() does both): a plain forward, as
        # lm-evaluation-harness makes, then runs exactly nanopipe's uncached attention.
        use_cache = past_key_values is not None if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0

        # Padding: only when the mask has zeros (all ones is the exact, unmasked path).
        key_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_mask = attention_mask[:, -(past + T):].bool()
        if position_ids is None:
            if key_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_tables(input_ids.device)
        if int(position_ids.max()) >= cos.size(0):
            raise ValueError(f"position {int(position_ids.max())} is beyond the rotary tables ({cos.size(0)} = "
                             f"sequence_len {self.config.sequence_len} x rotary_len_factor {self.config.rotary_len_factor})")
        dtype = self.lm_head.weight.dtype  # q/k's dtype: the rotary tables are cast once per forward
        position_ids = position_ids.expand(B, T)
        cos_sin = cos[position_ids].unsqueeze(2).to(dtype), sin[position_ids].unsqueeze(2).to(dtype)  # (B, T, 1, D/2)

        x = norm(self.transformer.wte(input_ids))
        x0 = x  # the normed embedding, mixed back into every layer (x0_lambdas)
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], cache, key_mask)
        x = norm(x)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
