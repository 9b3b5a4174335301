"""Sequence classification / regression models for the examples: the stock HF head, or mean pooling.

Sentence-embedding encoders (e.g. all-MiniLM-L6-v2) were trained with mean pooling over tokens; their [CLS] pooler
was never trained for it, so a [CLS] head starts from a weak feature. ``pooling="mean"`` puts a fresh linear head
on the attention-masked mean of the last hidden states instead. Either way the head is a module named
``classifier``, so ``modules_to_save=["classifier"]`` keeps it trainable under every method.

Both return ``accepts_loss_kwargs = False``: their loss is the mean over the batch, and a model that takes
``**kwargs`` in ``forward`` would otherwise be treated by the Trainer as one that divides by the global number of
labels itself (``num_items_in_batch``): under data parallelism the Trainer then multiplies the loss by the number of
processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean")


class MeanPoolingClassifier(nn.Module):
    """An encoder, the masked mean of its last hidden states, dropout and a linear ``classifier``."""

    accepts_loss_kwargs = False  # a batch-mean loss; the Trainer passes no num_items_in_batch

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_classifier(name_or_path: str, num_labels: int, pooling: str = "cls", **from_pretrained_kwargs) -> nn.Module:
    """Load a pretrained encoder with a fresh task head (``num_labels == 1`` means regression)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "mean":
        encoder = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, **from_pretrained_kwargs)
        dropout = getattr(encoder.config, "hidden_dropout_prob", 0.1)
        return MeanPoolingClassifier(encoder, num_labels, dropout=dropout)
    config = AutoConfig.from_pretrained(name_or_path, num_labels=num_labels)
    if num_labels == 1:
        config.problem_type = "regression"
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config, **from_pretrained_kwargs)
    model.accepts_loss_kwargs = False  # its loss is a batch mean (see the module docstring)
    return model
