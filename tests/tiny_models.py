"""Tiny random-init causal LMs of the families ringattn fuses RoPE for (built offline, no downloads)."""

import torch
import transformers

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
VOCAB = 97


def tiny_causal_lm(family: str = "llama", attn: str = "sdpa", dtype=torch.float32):
    """Two layers, 4 query heads over 2 KV heads of dim 16; the same weights for the same family."""
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)
