"""The `transformers` config of a nanopipe GPT (shipped with every export for `trust_remote_code`).

Self-contained on purpose: it is copied next to the weights and must import nothing of nanopipe.
The fields are nanopipe's GPTConfig (nanopipe.model.gpt) plus the constants its forward bakes in,
so a later change of a constant cannot silently change what an old export computes.
`transformers`' generic names (hidden_size, num_hidden_layers, max_position_embeddings, ...) map
onto ours, which is what generate(), the cache and lm-evaluation-harness read.
"""
from transformers import PretrainedConfig


class NanopipeConfig(PretrainedConfig):
    model_type = "nanopipe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(
        self,
        vocab_size: int = 32768,
        padded_vocab_size: int | None = None,  # rows of wte/lm_head (vocab rounded up to a multiple of 64)
        n_layer: int = 12,
        n_head: int = 6,
        n_kv_head: int = 6,
        n_embd: int = 768,
        sequence_len: int = 2048,  # the trained context; the long window of an "L" layer
        window_pattern: str = "SSSL",  # per layer, repeated: S = half context, L = full; the last layer is L
        rotary_base: float = 10000.0,
        rotary_len_factor: int = 10,  # rotary tables cover sequence_len * this (generation past the context)
        softcap: float = 15.0,
        ve_gate_channels: int = 32,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else -(-vocab_size // 64) * 64
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.sequence_len = sequence_len
        self.window_pattern = window_pattern
        self.rotary_base = rotary_base
        self.rotary_len_factor = rotary_len_factor
        self.softcap = softcap
        self.ve_gate_channels = ve_gate_channels
        kwargs.setdefault("tie_word_embeddings", False)  # wte and lm_head are separate matrices
        super().__init__(**kwargs)
