"""The one module of helpers the tests share (no downloads): tiny models built from configs, a tiny "pretrained"
RoBERTa folder and GLUE files, adapted models and their perturbations, datasets and trainer arguments, the layer
matrix (one case list: method x layer kind x dtype) with its float64 reference, and the functions the generated
torchrun script of ``tests/test_bidora_trainer.py`` imports. Test files import from here, never from one another
(``tests/test_import_graph.py`` checks); ``tests/ridge_toy.py`` is the toy bi-level problem."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

import loralib
from loralib import BiDoRATrainer, BiDoRATrainingArguments
from loralib.model import _LAYER_CLASSES

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dora", "bidora")


# ---- tiny models ------------------------------------------------------------------------------------------------
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


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """SmolLM2's layout (Llama, grouped-query attention, tied embeddings) at toy sizes; ``overrides`` go to the
    LlamaConfig (vocabulary, sizes, special tokens, ``tie_word_embeddings=False`` for an untied head)."""
    settings = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)


def token_batch(batch: int = 3, length: int = 7, vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_example(name: str, rel: str):
    """Import the script ``rel`` (relative to the repository) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64 on the CPU."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


# ---- a tiny "pretrained" RoBERTa folder and GLUE-format files ----------------------------------------------------
GLUE_WORDS = "the cat sat on a mat dog ran far away he said hi good bad movie great awful fine plot".split()
GLUE_VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(GLUE_WORDS)}}


def bpe_tokenizer(corpus: list[str], vocab_size: int, special_tokens: list[str], *, byte_level: bool = True,
                  min_frequency: int = 0, post_processor=None, **fast_kwargs):
    """A BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` on the fly (no download): byte-level (GPT-2 /
    RoBERTa style, with its decoder and the 256-byte initial alphabet) or whitespace-split words.
    ``post_processor(tokenizer) -> processor`` is called after training (it may need token ids); ``fast_kwargs``
    go to ``PreTrainedTokenizerFast`` (special token names, chat_template, add_prefix_space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    extra = {}
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as roberta-base's / SmolLM2's
        tok.decoder = decoders.ByteLevel()
        extra["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                        special_tokens=special_tokens, show_progress=False, **extra))
    if post_processor is not None:
        tok.post_processor = post_processor(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs)


def write_tiny_roberta(directory: Path, seed: int = 0) -> Path:
    """A 2-layer RoBERTa (hidden 16) and a WordLevel tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaForMaskedLM

    tok = Tokenizer(models.WordLevel(GLUE_VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(GLUE_VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        type_vocab_size=1,
    )
    RobertaForMaskedLM(config).save_pretrained(directory)
    return directory


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(GLUE_WORDS) for _ in range(rng.randint(3, 8)))


def write_task_files(directory: Path, task: str, sizes=(48, 16, 16), seed: int = 0) -> dict[str, Path]:
    """GLUE-layout csv files for ``task`` (sst2, mrpc, stsb, mnli) whose labels depend on the words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits = ["train", "dev", "test"] if task != "mnli" else ["train", "dev_m", "dev_mm"]
    paths = {}
    for split, n in zip(splits, sizes):
        rows = []
        for _ in range(n):
            a, b = _sentence(rng), _sentence(rng)
            positive = ("good" in a) or ("great" in a)
            if task == "sst2":
                rows.append({"sentence": a, "label": int(positive)})
            elif task == "mrpc":
                rows.append({"sentence1": a, "sentence2": b, "label": int(positive)})
            elif task == "stsb":
                rows.append(
                    {"sentence1": a, "sentence2": b, "label": round(5 * len(set(a.split()) & set(b.split())) / 8, 3)}
                )
            elif task == "mnli":
                rows.append({"premise": a, "hypothesis": b, "label": len(a.split()) % 3})
            else:
                raise ValueError(task)
        path = directory / f"{task}_{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths[split] = path
    return paths


# ---- adapted models, perturbations, snapshots --------------------------------------------------------------------
def adapted(method: str = "dora", seed: int = 0, dtype: torch.dtype = torch.float32, targets=("query", "value"),
            dropout: float = 0.0, eval_mode: bool = False, **kw):
    """The tiny RoBERTa with adapters (r 4, alpha 8, the classifier trained whole; ``kw`` to the AdapterConfig);
    ``"ft"``: without adapters. ``eval_mode``: returned in eval mode."""
    model = tiny_roberta(seed=seed, dtype=dtype)
    if method != "ft":
        settings = dict(method=method, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets),
                        modules_to_save=["classifier"])
        settings.update(kw)
        loralib.apply_adapters(model, loralib.AdapterConfig(**settings))
    return model.eval() if eval_mode else model


def perturb(model, seed: int = 1, move_a: bool = False, saved_modules: bool = True):
    """Non-trivial loralib adapters: B random (it starts at zero), magnitudes moved, A moved too with ``move_a``,
    and (``saved_modules``) the modules trained whole."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            if move_a:
                layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=gen, dtype=layer.lora_A.dtype))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen, dtype=layer.lora_B.dtype))
            if layer.decomposed:
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=gen, dtype=torch.float64))
        if saved_modules:
            for param in loralib.saved_module_parameters(model).values():
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def perturb_by_name(model, seed: int = 1, trainable: bool = True):
    """Non-trivial weights by parameter name, for loralib's models and PEFT's alike: every ``lora_*`` and
    ``modules_to_save`` tensor moved, magnitudes scaled; with ``trainable`` every other trainable parameter too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if "magnitude" in name:
                param.mul_(1 + 0.1 * noise.abs())
            elif "lora_" in name or "modules_to_save" in name or (trainable and param.requires_grad):
                param.add_(0.1 * noise)
    return model


def save_version_1(model, directory):
    """The folder ``loralib.save_adapters`` wrote before loralib adopted PEFT's format (version 1)."""
    config = loralib.get_adapter_config(model)
    layers = loralib.adapter_layers(model)
    scalings = {name: layer.scaling for name, layer in layers}
    meta = {
        "format": "loralib-adapter",
        "version": 1,
        "config": config.to_dict(),
        "scaling": next(iter(scalings.values())) if len(set(scalings.values())) == 1 else None,
        "module_scaling": scalings,
        "base_model_class": type(model).__name__,
        "adapted_modules": {name: list(layer.base_weight().shape) for name, layer in layers},
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(loralib.adapter_state_dict(model), str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


# ---- datasets, callbacks, trainer arguments ----------------------------------------------------------------------
class Tokens(torch.utils.data.Dataset):
    """Classification rows of ``length`` ids in [low, vocab); the label: the first id above vocab / 2."""

    def __init__(self, n: int = 24, length: int = 8, seed: int = 0, low: int = 3, vocab: int = 100):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, vocab, (n, length), generator=gen)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class Sequences(torch.utils.data.Dataset):
    """Pre-tokenised language-modelling rows (labels = ids) for a causal LM."""

    def __init__(self, n: int = 8, length: int = 8, vocab: int = 64, low: int = 0):
        self.ids = torch.randint(low, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):
    """Stops training at the end of step ``step`` (an interrupted run, to resume)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def plain_args(out, **kw) -> TrainingArguments:
    """transformers.TrainingArguments for a short CPU run (6 steps, checkpoints every 2)."""
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def args(out, **kw) -> BiDoRATrainingArguments:
    """BiDoRATrainingArguments for a short CPU run (6 steps, checkpoints every 2, a quarter held out)."""
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=6, save_steps=2,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, upper_fraction=0.25,
    )
    base.update(kw)
    return BiDoRATrainingArguments(**base)


# ---- the runs tests/test_bidora_trainer.py compares across torchrun processes (its script imports these) ---------
def ddp_run(out, hypergradient: str, per_device: int) -> dict[str, torch.Tensor]:
    """4 steps of BiDoRA in float64 at a global batch of 4 (lower and upper), sequential data, dropout 0."""
    model = adapted("bidora", dtype=torch.float64)
    settings = args(out, per_device_train_batch_size=per_device, upper_batch_size=per_device, max_steps=4,
                    save_strategy="no", upper_fraction=0.2, hypergradient=hypergradient, neumann_alpha=0.1,
                    train_sampling_strategy="sequential", upper_learning_rate=5e-3)
    BiDoRATrainer(model=model, args=settings, train_dataset=Tokens(n=20)).train()
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n or "magnitude" in n}


LM_CASES = (("dora", ""), *(("bidora", h) for h in ("darts", "neumann", "cg", "first_order", "sama", "damped_solve")))


class Sentences(torch.utils.data.Dataset):
    """Rows of 2-12 real tokens: padded batches whose processes hold very different numbers of label tokens."""

    def __init__(self, n: int = 20):
        gen = torch.Generator().manual_seed(1)
        lengths = [2 + (7 * i) % 11 for i in range(n)]
        self.rows = [torch.randint(3, 100, (k,), generator=gen) for k in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def pad_causal(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding; labels = the ids, -100 on the padding (the model shifts them)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = f["input_ids"]
        mask[row, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lm_run(out, method: str, hypergradient: str, per_device: int) -> dict[str, torch.Tensor]:
    """3 steps of DoRA or BiDoRA on a tiny float64 Llama at a global batch of 4 padded rows (lower and upper)."""
    model = tiny_llama(dtype=torch.float64, vocab_size=100, intermediate_size=32, num_key_value_heads=2,
                       tie_word_embeddings=False, pad_token_id=0)
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=2, lora_alpha=4,
                                                        target_modules=["q_proj", "v_proj"]))
    bilevel = dict(upper_fraction=0.2, hypergradient=hypergradient, neumann_alpha=0.1,
                   upper_learning_rate=5e-3, upper_batch_size=per_device) if method == "bidora" else \
        dict(upper_fraction=0.0)
    settings = args(out, per_device_train_batch_size=per_device, max_steps=3, save_strategy="no",
                    train_sampling_strategy="sequential", learning_rate=2e-2, **bilevel)
    BiDoRATrainer(model=model, args=settings, train_dataset=Sentences(), data_collator=pad_causal).train()
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n or "magnitude" in n}


def sft_run(out, hypergradient: str, per_device: int) -> dict[str, torch.Tensor]:
    """3 steps of BiDoRA through TRL's SFTTrainer (``BiDoRASFTTrainer``) on the tiny float64 Llama of
    :func:`lm_run`: pre-tokenised rows of 2-12 tokens, padded by TRL's collator, global batch 4 (both levels)."""
    from datasets import Dataset

    from loralib.sft import BiDoRASFTConfig, BiDoRASFTTrainer

    tokenizer = bpe_tokenizer(["a b c d"], 8, ["<pad>", "</s>"], byte_level=False, pad_token="<pad>",
                              eos_token="</s>")
    model = tiny_llama(dtype=torch.float64, vocab_size=100, intermediate_size=32, num_key_value_heads=2,
                       tie_word_embeddings=False, pad_token_id=0)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, lora_alpha=4,
                                                        target_modules=["q_proj", "v_proj"]))
    rows = Dataset.from_list([{"input_ids": r.tolist()} for r in Sentences().rows])
    settings = BiDoRASFTConfig(
        output_dir=str(out), per_device_train_batch_size=per_device, upper_batch_size=per_device, max_steps=3,
        learning_rate=2e-2, upper_learning_rate=5e-3, upper_fraction=0.2, hypergradient=hypergradient,
        neumann_alpha=0.1, train_sampling_strategy="sequential", save_strategy="no", report_to="none",
        use_cpu=True, seed=0, max_length=24, logging_steps=1, disable_tqdm=True)
    BiDoRASFTTrainer(model=model, args=settings, train_dataset=rows, processing_class=tokenizer).train()
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n or "magnitude" in n}


def refused_token_averaging(out) -> bool:
    """Under torchrun, an explicit average_tokens_across_devices=True is refused with its reason."""
    model = adapted("dora")
    try:
        BiDoRATrainer(model=model, args=args(out, max_steps=1, upper_fraction=0.0, average_tokens_across_devices=True),
                      train_dataset=Tokens()).train()
    except ValueError as err:
        return "average_tokens_across_devices=True" in str(err) and "share of the global batch" in str(err)
    return False


# ---- the layer matrix: one case list, method x layer kind x dtype --------------------------------------------------
IN, OUT, R, ALPHA = 5, 7, 3, 6.0
KINDS = ("linear", "conv1d", "embedding")
LAYER_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
LAYER_CASES = [
    (method, kind, dtype)
    for method in METHODS
    for kind in KINDS
    for dtype in LAYER_DTYPES
    if not (kind == "embedding" and method == "bidora")  # BiDoRA adapts no embeddings
]


def layer_cases(dtypes=LAYER_DTYPES, methods=METHODS, kinds=KINDS) -> list[tuple]:
    """The cases of :data:`LAYER_CASES` with these dtypes, methods and kinds, in its order."""
    return [c for c in LAYER_CASES if c[0] in methods and c[1] in kinds and c[2] in dtypes]


def reference_weight(w0_out_in, a, b, scaling, magnitude):
    """Dense ``(out, in)`` adapted weight, written from the definitions (float64)."""
    adapted = w0_out_in + scaling * (b @ a)
    if magnitude is None:
        return adapted
    return magnitude[:, None] * adapted / torch.linalg.vector_norm(adapted, dim=1, keepdim=True)


def make_base(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(IN, OUT).double()
    if kind == "conv1d":  # GPT-2 style, weight stored (in, out): fan_in_fan_out
        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
        return base.double()
    if kind == "embedding":
        return nn.Embedding(IN, OUT).double()
    raise AssertionError(kind)


def w0_of(kind: str, base: nn.Module) -> torch.Tensor:
    """The base weight as ``(out, in)``."""
    w = base.weight.detach().clone()
    return w if kind == "linear" else w.T


def adapter_class(method: str, base: nn.Module):
    return dict(_LAYER_CLASSES[method])[nn.Embedding if isinstance(base, nn.Embedding) else type(base)]


def build_layer(method: str, kind: str, dtype: torch.dtype = torch.float64, perturb: bool = True, seed: int = 0,
                **kw):
    """``(base, layer)``: a frozen base of ``kind`` in ``dtype`` and its adapter (r R, alpha ALPHA, ``kw`` to
    ``from_base``), differentiable in every parameter; ``perturb``: B random and magnitudes moved."""
    torch.manual_seed(seed)
    base = make_base(kind).to(dtype)
    base.requires_grad_(False)  # frozen, as apply_adapters leaves it
    layer = adapter_class(method, base).from_base(base, r=R, lora_alpha=ALPHA, **kw)
    layer.joint_magnitude_training = True  # these tests differentiate the layer in every parameter
    if perturb:  # a non-zero update so the adapter path is exercised
        with torch.no_grad():
            layer.lora_B.normal_()
            if layer.decomposed:
                layer.magnitude.mul_(torch.linspace(0.5, 1.5, OUT, dtype=layer.magnitude.dtype))
    return base, layer


def make_input(kind: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, IN, (4, 6), generator=gen)
    return torch.randn(4, 6, IN, generator=gen, dtype=torch.float64)


def as_features(kind: str, x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x, IN).double() if kind == "embedding" else x
