"""After a forward returns, no module holds a piece of its autograd graph (issue 19): deepcopy, pickle and torch.save
of a DoRA / BiDoRA model work after training steps and after eval-with-grad forwards, and carry nothing of the graph.
The orthogonality penalty reuses the forward's row norms only through the explicit ``capture_norm_terms`` path."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

import loralib
from loralib.model import _LAYER_CLASSES, capture_norm_terms
from tests.helpers import layer_cases, tiny_gpt2, tiny_roberta, token_batch


def _graph_tensors(value, where: str):
    if isinstance(value, torch.Tensor):
        return [where] if value.grad_fn is not None else []
    if isinstance(value, (tuple, list)):
        return [hit for i, v in enumerate(value) for hit in _graph_tensors(v, f"{where}[{i}]")]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _graph_tensors(v, f"{where}[{k!r}]")]
    return []


def graph_tensors(model: nn.Module) -> list[str]:
    """Every tensor with a ``grad_fn`` held in a module's ``__dict__`` (directly or in a tuple / list / dict)."""
    modules = model.named_modules()
    return [hit for name, m in modules for k, v in vars(m).items() for hit in _graph_tensors(v, f"{name}.{k}")]


def tensor_attributes(model: nn.Module) -> dict[str, set[str]]:
    """Per module, the ``__dict__`` keys that hold tensors, parameters, buffers and submodules aside."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {
        name: {k for k, v in vars(m).items() if k not in skip and _holds_tensor(v)} for name, m in model.named_modules()
    }


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


# ---- single layers -----------------------------------------------------------------------------------------------
def layer_and_input(method: str, kind: str):
    torch.manual_seed(0)
    base = {"linear": nn.Linear(6, 5), "conv1d": Conv1D(5, 6), "embedding": nn.Embedding(6, 5)}[kind].double()
    cls = dict(_LAYER_CLASSES[method])[type(base)]
    layer = cls.from_base(base, r=2, lora_alpha=4)
    layer.joint_magnitude_training = True
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randint(0, 6, (3, 4)) if kind == "embedding" else torch.randn(3, 4, 6, dtype=torch.float64)
    return layer, x


# the decomposed methods' rows of the layer matrix (the dtype is float64 here)
LAYERS = [(method, kind) for method, kind, _ in layer_cases(dtypes=(torch.float64,), methods=("dora", "bidora"))]


@pytest.mark.parametrize("method,kind", LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval_with_grad"])
def test_layer_forward_leaves_no_graph_and_deepcopies(method, kind, mode):
    layer, x = layer_and_input(method, kind)
    layer.train(mode == "train")
    out = layer(x)
    assert out.grad_fn is not None
    assert graph_tensors(layer) == []
    clone = copy.deepcopy(layer)  # failed with "Only Tensors created explicitly by the user ..." before
    out.sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(x)
    assert graph_tensors(layer) == []
    clone = copy.deepcopy(layer)
    layer.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


# ---- whole models ------------------------------------------------------------------------------------------------
def adapted_model(name: str):
    if name.startswith("roberta_dora"):  # "roberta_dora_bf16": a bf16 base, fp32 adapters
        model = tiny_roberta(dtype=torch.bfloat16) if name.endswith("bf16") else tiny_roberta().double()
        config = loralib.AdapterConfig(method="dora", r=2, lora_alpha=4, target_modules="all-linear")
        batch = {**token_batch(), "labels": torch.tensor([0, 1, 1])}
    else:  # GPT-2: Conv1D layers, BiDoRA
        model = tiny_gpt2().double()
        config = loralib.AdapterConfig(method="bidora", r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"])
        ids = token_batch(vocab=50)["input_ids"]
        batch = {"input_ids": ids, "labels": ids}
    loralib.apply_adapters(model, config)
    loralib.allow_joint_magnitude_training(model)
    return model, batch


def train_steps(model, batch, steps: int = 2, with_penalty: bool = True) -> None:
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        with capture_norm_terms(model) as terms:
            loss = model(**batch).loss
        if with_penalty:
            loss = loss + 1e-2 * loralib.orthogonality_penalty(model, terms=terms)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()


@pytest.mark.parametrize("name", ["roberta_dora", "gpt2_bidora"])
def test_model_deepcopy_after_training_and_eval_with_grad(name):
    model, batch = adapted_model(name)
    train_steps(model, batch)
    model(**batch)  # a training forward outside any capture, whose graph is simply dropped
    assert graph_tensors(model) == []
    ema = copy.deepcopy(model)  # e.g. an EMA copy
    model.eval()
    loss = model(**batch).loss  # eval with gradients enabled
    assert loss.grad_fn is not None and graph_tensors(model) == []
    ema.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(ema(**batch).logits, expected, rtol=0, atol=0)
        merged = loralib.merge_and_unload(copy.deepcopy(model))
        assert not loralib.adapter_layers(merged)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["roberta_dora", "roberta_dora_bf16", "gpt2_bidora"])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_serialised_model_carries_nothing_of_the_forward(name, how):
    model, batch = adapted_model(name)

    def dump() -> bytes:
        if how == "pickle":
            return pickle.dumps(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return buffer.getvalue()

    def load(data: bytes) -> nn.Module:
        return pickle.loads(data) if how == "pickle" else torch.load(io.BytesIO(data), weights_only=False)

    # baseline: the frozen-weight caches a forward fills in, and no graph (a no_grad forward, then train mode)
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    baseline_size, baseline_attributes = len(dump()), tensor_attributes(model)
    model(**batch)  # a training forward with gradients
    data = dump()
    assert len(data) <= baseline_size
    loaded = load(data)
    assert tensor_attributes(loaded) == baseline_attributes
    assert graph_tensors(loaded) == []


def test_bidora_trainer_leaves_a_deep_copyable_model(tmp_path):
    """Lower steps with the penalty (compute_loss) and darts upper steps, then the EMA / merge-a-copy patterns."""
    from loralib import BiDoRATrainer
    from tests.helpers import Tokens, adapted, args

    model = adapted("bidora")
    BiDoRATrainer(model=model, args=args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=Tokens()).train()
    assert graph_tensors(model) == []
    merged = loralib.merge_and_unload(copy.deepcopy(model))
    batch = token_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


# ---- the penalty from captured terms -----------------------------------------------------------------------------
class Shared(nn.Module):
    """``a`` runs twice (once possibly under reentrant checkpointing, i.e. no_grad), ``c`` never runs."""

    def __init__(self, reentrant: str) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        first = checkpoint(self.a, x, use_reentrant=True) if self.reentrant == "first" else self.a(x)
        second = checkpoint(self.a, first, use_reentrant=True) if self.reentrant == "second" else self.a(first)
        return self.b(second)


def dense_penalty(model) -> torch.Tensor:
    """Mean ``‖V̂V̂ᵀ − I‖_F`` over the adapted layers, from the dense float64 direction (independent of loralib)."""
    values = []
    for _, layer in loralib.adapter_layers(model):
        dense = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
        unit = dense / torch.linalg.vector_norm(dense, dim=1, keepdim=True)
        values.append(torch.linalg.matrix_norm(unit @ unit.T - torch.eye(unit.shape[0], dtype=unit.dtype)))
    return torch.stack(values).mean()


@pytest.mark.parametrize("reentrant", ["none", "first", "second"])
def test_penalty_from_captured_terms_equals_dense_penalty(reentrant):
    torch.manual_seed(0)
    model = Shared(reentrant).double()
    config = loralib.AdapterConfig(method="dora", r=2, lora_alpha=4, target_modules=["a", "b", "c"])
    loralib.apply_adapters(model, config)
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.normal_()
    model.train()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with capture_norm_terms(model) as terms:
        out = model(x)
    assert set(terms) == {model.a, model.b}  # c never ran
    assert terms[model.a][0].requires_grad  # a record with gradient is never replaced by a no_grad one
    assert graph_tensors(model) == [] and all("_norm_terms_sink" not in vars(m) for m in model.modules())
    penalty = loralib.orthogonality_penalty(model, terms=terms)
    expected = dense_penalty(model)
    torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=1e-12)
    # gradients of forward + penalty through the shared graph (.backward: reentrant checkpointing refuses .grad)
    params = [p for _, layer in loralib.adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]
    (out.sum() + penalty).backward()
    got = [p.grad.clone() for p in params]
    model.zero_grad()
    (model(x).sum() + expected).backward()
    for p, g in zip(params, got):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def test_capture_leaves_nothing_on_the_layers_even_on_error_and_nests():
    model, batch = adapted_model("roberta_dora")
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_norm_terms(model):
            model(**batch)
            raise RuntimeError("boom")
    assert all("_norm_terms_sink" not in vars(m) for m in model.modules())
    assert graph_tensors(model) == []
    with capture_norm_terms(model) as outer:
        with capture_norm_terms(model) as inner:
            model(**batch)
        assert inner and not outer
        model(**batch)
        assert set(outer) == set(inner)
    assert all("_norm_terms_sink" not in vars(m) for m in model.modules())
    copy.deepcopy(model)
