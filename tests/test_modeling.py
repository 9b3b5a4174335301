"""The example heads: mean pooling against an explicit computation, losses, and adapters on top."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import loralib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "NLU"))
from modeling import MeanPoolingClassifier, load_classifier  # noqa: E402


def tiny_encoder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=20,
    )
    BertModel(config).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


def test_mean_pooling_matches_explicit_mean(tmp_path):
    model = load_classifier(str(tiny_encoder(tmp_path)), num_labels=3, pooling="mean").eval()
    assert isinstance(model, MeanPoolingClassifier)
    ids = torch.randint(2, 60, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([0, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
    expected = pooled @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, labels), rtol=1e-5, atol=1e-6)


def test_regression_head_uses_mse(tmp_path):
    path = str(tiny_encoder(tmp_path))
    for pooling in ("mean", "cls"):
        model = load_classifier(path, num_labels=1, pooling=pooling).eval()
        ids = torch.randint(2, 60, (3, 5))
        labels = torch.tensor([0.5, -1.0, 2.0])
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels), rtol=1e-6, atol=1e-7)


def test_adapters_on_mean_pooling_head(tmp_path):
    model = load_classifier(str(tiny_encoder(tmp_path)), num_labels=2, pooling="mean")
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, modules_to_save=["classifier"]))
    head = {id(p) for p in model.classifier.parameters()}
    assert head <= {id(p) for p in loralib.direction_parameters(model)}
    with pytest.raises(ValueError, match="pooling"):
        load_classifier("unused", 2, pooling="max")
