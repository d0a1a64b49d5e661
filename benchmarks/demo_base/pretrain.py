"""The demo base's recipe: a byte-level BPE tokenizer and a small DeepSeek-V2-style MoE, pretrained from scratch.

    python benchmarks/demo_base/pretrain.py --out expert_hub/demo/base   (or: make demo-base)

The model has DeepSeek-V2-Lite's shape in miniature (a dense first layer, then MoE layers of 64 small routed
experts with top-6 routing and 2 shared experts) and learns the built-in tasks marked `in_demo_base` plus the
generic text (`tasks/general.py`), which uses the held-out tasks' words but never their answers; those tasks are
left for ESFT to learn. Everything is seeded, so the recipe reproduces the
checkpoint on the same software; what it ran with, how long it took and how the result scores and routes are
recorded in `expert_hub_base.json` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import measure_base  # beside this script
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from expert_hub.data import IGNORE_INDEX, pack, tokenize_conversation
from expert_hub.families import moe_layers
from expert_hub.io import atomic_directory, write_json_atomic
from expert_hub.models import BASE_METADATA
from expert_hub.tasks import BUILTIN_TASKS
from expert_hub.training.loop import param_groups

MODEL_SHAPE = dict(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    first_k_dense_replace=1,
    intermediate_size=512,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    moe_intermediate_size=64,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    # vLLM's CPU attention runs DeepSeek's MLA only with these sizes
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


@dataclass(frozen=True)
class Recipe:
    seed: int = 20261129
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decay to this share of the peak
    weight_decay: float = 0.1
    balance_loss: float = 0.01  # expert-level load balancing, as DeepSeek-V2 pretrains with
    examples_per_task: int = 60000
    tokenizer_vocab: int = 1024

    @property
    def tasks(self) -> list[str]:
        return [name for name, task in BUILTIN_TASKS.items() if task.in_demo_base]


# ESFT defaults for this base, read by `expert-hub train` when the base ships them: a few minutes on 2 CPU cores.
# p = 0.35 rather than the paper's 0.2: this base's experts are 64 times smaller than DeepSeek-V2-Lite's, and at
# 0.2 (4-6 per layer) a held-out task runs out of capacity; 0.35 selects 7-11 of 64 per layer.
TRAINING_DEFAULTS = dict(
    steps=300,
    batch_size=8,
    grad_accumulation=1,
    seq_len=256,
    learning_rate=3e-3,
    top_p=0.35,
    score_tokens=16384,
    save_every=100,
    eval_every=100,
    gradient_checkpointing=False,
)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with single-digit numbers, which small models do arithmetic with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<bos>")  # prompts sent to a server get the BOS that training puts first
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def pretrain(out: Path, recipe: Recipe, console: Console) -> dict:
    started = time.time()
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    conversations = [
        messages
        for name in recipe.tasks
        for messages in BUILTIN_TASKS[name].examples("train", recipe.examples_per_task)
    ]
    # The tokenizer learns from the pretraining text only: a token the model never saw keeps an untrained output
    # row, which no expert can make likely, so held-out words must split into pieces the model knows.
    tokenizer = train_tokenizer([m["content"] for c in conversations for m in c], recipe.tokenizer_vocab)
    config = AutoConfig.for_model(
        "deepseek_v2",
        **MODEL_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    random.Random(recipe.seed).shuffle(conversations)
    token_ids = (tokenize_conversation(messages, tokenizer)[0] for messages in conversations)
    # Loss on every token (language modelling), so packed labels are the ids themselves.
    blocks = pack(((ids, ids) for ids in token_ids), recipe.seq_len, tokenizer.pad_token_id, 0.0, recipe.seed)
    console.print(
        f"{len(conversations):,} conversations of {', '.join(recipe.tasks)} -> {len(blocks):,} blocks "
        f"of {recipe.seq_len} tokens; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )

    losses = _train(model, blocks, recipe, tokenizer.pad_token_id, console)
    model.eval()
    measured = measure_base(model, tokenizer, console)
    seconds = time.time() - started
    metadata = {
        "name": "expert-hub demo base",
        "recipe": {
            "command": "python benchmarks/demo_base/pretrain.py --out DIR",
            **asdict(recipe),
            "data_mix": dict.fromkeys(recipe.tasks, recipe.examples_per_task),
            "held_out": [name for name, task in BUILTIN_TASKS.items() if not task.in_demo_base],
        },
        "seconds": round(seconds, 1),
        "final_train_loss": round(losses[-1], 4),
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        **measured,
        "training_defaults": TRAINING_DEFAULTS,
    }
    with atomic_directory(out, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / BASE_METADATA, metadata)
    console.print(f"Saved the demo base to {out} after {seconds / 60:.1f} min")
    return metadata


def _train(model, blocks, recipe: Recipe, pad_token_id: int, console: Console) -> list[float]:
    """AdamW with warm-up and cosine decay, plus an expert-balance loss so every expert gets used."""
    groups = param_groups(dict(model.named_parameters()), recipe.weight_decay)  # as `expert-hub train` groups them
    optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.95))
    balance = _BalanceLoss(model)
    order = random.Random(recipe.seed)
    indices: list[int] = []
    losses = []
    model.train()
    for step in range(1, recipe.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate * _lr_factor(step, recipe)
        if len(indices) < recipe.batch_size:
            fresh = list(range(len(blocks)))
            order.shuffle(fresh)
            indices += fresh
        batch, indices = indices[: recipe.batch_size], indices[recipe.batch_size :]
        input_ids = torch.tensor([blocks[i][0] for i in batch])
        labels = input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
        balance.reset()
        loss = model(input_ids=input_ids, labels=labels).loss
        (loss + recipe.balance_loss * balance.value()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            console.print(f"step {step}/{recipe.steps} loss {recent:.4f} balance {balance.value().item():.3f}")
    balance.remove()
    return losses


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step <= recipe.warmup_steps:
        return step / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.final_lr_ratio + (1 - recipe.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _BalanceLoss:
    """Switch-style balance loss summed over MoE layers: experts * sum(share of picks * mean router probability)."""

    def __init__(self, model) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.router.register_forward_hook(self._hook) for layer in moe_layers(model)]

    def _hook(self, router, inputs, output) -> None:
        logits, _, indices = output
        experts = logits.shape[-1]
        picks = F.one_hot(indices, experts).sum(dim=1).float().mean(dim=0) / indices.shape[-1]
        self.terms.append(experts * (picks * logits.softmax(dim=-1).mean(dim=0)).sum())

    def value(self) -> torch.Tensor:
        return torch.stack(self.terms).mean()

    def reset(self) -> None:
        self.terms.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    args = parser.parse_args()
    metadata = pretrain(args.out, Recipe(steps=args.steps), Console(stderr=True))
    print(
        json.dumps({key: metadata[key] for key in ("seconds", "final_train_loss", "evaluation", "routing")}, indent=2)
    )


if __name__ == "__main__":
    main()
