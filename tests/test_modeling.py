"""The example heads: mean pooling against an explicit computation, losses, and adapters on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from modeling import MeanPoolingClassifier, load_classifier  # noqa: E402
from transformers import BertConfig, BertModel

import loralib


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


def test_both_heads_tell_the_trainer_their_loss_is_a_batch_mean(tmp_path):
    """Otherwise a forward(**kwargs) model counts as one that divides by num_items_in_batch itself, and under DDP the
    Trainer multiplies its loss by the number of processes."""
    path = str(tiny_encoder(tmp_path))
    for pooling in ("mean", "cls"):
        assert load_classifier(path, num_labels=2, pooling=pooling).accepts_loss_kwargs is False


@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_mean_pooling_model_trains_checkpoints_and_resumes_under_the_trainer(tmp_path, method):
    """The demo's head is a plain nn.Module, not a PreTrainedModel: the Trainer saves and reloads its state dict."""
    from loralib import BiDoRATrainer, BiDoRATrainingArguments
    from tests.helpers import StopAt, Tokens

    encoder = tiny_encoder(tmp_path)

    def model():
        torch.manual_seed(0)
        m = load_classifier(str(encoder), num_labels=2, pooling="mean")
        loralib.apply_adapters(m, loralib.AdapterConfig(method=method, r=2, modules_to_save=["classifier"]))
        return m

    def args(out):
        return BiDoRATrainingArguments(output_dir=str(tmp_path / out), max_steps=4, save_steps=2, learning_rate=1e-2,
                                       per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0,
                                       disable_tqdm=True, upper_fraction=0.25)

    rows = Tokens(length=6, low=2, vocab=60)  # 24 rows of 6 ids, labelled by the first id
    whole = model()
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    BiDoRATrainer(model=whole, args=args("whole"), train_dataset=rows).train()
    assert not torch.equal(whole.classifier.weight, before["classifier.weight"])
    embeddings = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(whole.get_submodule("encoder.embeddings.word_embeddings").weight, before[embeddings])
    BiDoRATrainer(model=model(), args=args("cut"), train_dataset=rows, callbacks=[StopAt(2)]).train()
    resumed = model()
    BiDoRATrainer(model=resumed, args=args("cut"), train_dataset=rows).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    expected = dict(whole.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in resumed.named_parameters())
