"""Random-weight MoE models and a byte-level tokenizer, built in code.

Tests and benchmarks cannot reach the Hugging Face Hub, so they build small models of each supported family
here and save them like any checkpoint. Not for production use: the weights are random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Small but complete: 4 layers, 8 routed experts, top-2, with each family's quirks switched on
# (DeepSeek's dense first layer, shared experts, group-limited routing with a score bias, gpt_oss biases).
_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    initializer_range=0.1,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)
_FAMILY_CONFIGS: dict[str, dict] = {
    "deepseek_v2": dict(
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=96,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=96,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "qwen2_moe": dict(
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        intermediate_size=96,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96, head_dim=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, intermediate_size=32),
    "mixtral": dict(num_local_experts=8, intermediate_size=32),
    "gpt_oss": dict(
        num_local_experts=8,
        intermediate_size=32,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
TINY_FAMILIES = tuple(_FAMILY_CONFIGS)

# Shapes vLLM's CPU engine accepts (attention head size >= 32; DeepSeek's MLA needs kv_lora_rank 512, rope 64).
SERVING_SHAPES: dict[str, dict] = {
    "qwen3_moe": dict(
        hidden_size=128,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        num_key_value_heads=2,
    ),
    "deepseek_v2": dict(
        hidden_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
    ),
}


def tiny_config(family: str, **overrides):
    """A small random-model config of `family` (a transformers `model_type`)."""
    values = _COMMON | _FAMILY_CONFIGS[family] | overrides
    return AutoConfig.for_model(family, **values)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus BOS/EOS/PAD. Handles any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):  # ids 256, 257, 258, as in the tiny configs
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}",
    )


def build_tiny_model(
    family: str, path: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a random `family` model and the byte tokenizer to `path` (in shards of `max_shard_size`, e.g. "64MB",
    when given); returns the path."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_router_biases(model)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def _randomize_router_biases(model) -> None:
    """Initialisation zeroes DeepSeek-V3's selection bias; a random one makes tests see it matter."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.1)
