"""Tiny transformers models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)


def tiny_roberta(num_labels: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer RoBERTa classifier: hidden 16, intermediate 40 (non-square dense layers), vocab 100."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=40,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    kwargs.update(overrides)
    model = RobertaForSequenceClassification(RobertaConfig(**kwargs))
    return model.to(dtype)


def tiny_bert(num_labels: int = 2, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        num_labels=num_labels,
    )
    kwargs.update(overrides)
    return BertForSequenceClassification(BertConfig(**kwargs))


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def token_batch(batch: int = 3, length: int = 7, vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
