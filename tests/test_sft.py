"""BiDoRA under TRL's SFTTrainer (loralib.sft) on a tiny Llama built from a config and a BPE tokenizer trained on the
fly: the reconciled defaults, the upper split prepared as SFTTrainer prepares train (conversations, text,
pre-tokenised rows, packing), both levels training, SFTTrainer's metrics untouched by the upper step, the upper loss
written out by hand, and the refusals."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the test extra installs trl (loralib.sft.TRL_REQUIREMENT)")

import huggingface_hub  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from transformers.utils import is_torch_bf16_gpu_available  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import loralib  # noqa: E402
from loralib import BiDoRASFTConfig, BiDoRASFTTrainer  # noqa: E402
from loralib.bidora_trainer import BiDoRATrainer  # noqa: E402
from loralib.data import split_indices  # noqa: E402
from loralib.model import magnitudes_trainable  # noqa: E402
from loralib.training_args import BiDoRATrainingArguments  # noqa: E402
from tests.helpers import StopAt, bpe_tokenizer, snapshot

REPO = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang songs of spring in green fields".split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FORMATS = ("messages", "text", "input_ids")
N_ROWS, FRACTION, BATCH, MAX_LENGTH = 20, 0.25, 4, 24


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings at construction


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level BPE trained on the test's words, with pad / EOS tokens and a small chat template."""
    return bpe_tokenizer([" ".join(WORDS)] * 3, 80, ["<pad>", "</s>", "<|user|>", "<|assistant|>", "<unk>"],
                         byte_level=False, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                         chat_template=TEMPLATE)


def sentences(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=gen).tolist())
            for k in torch.randint(3, 9, (n,), generator=gen)]


def raw_dataset(fmt: str, tokenizer, n: int = N_ROWS) -> Dataset:
    prompts, answers = sentences(n, 1), sentences(n, 2)
    if fmt == "messages":
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                for p, a in zip(prompts, answers)]
    elif fmt == "text":
        rows = [{"text": f"{p} {a}"} for p, a in zip(prompts, answers)]
    elif fmt == "prompt_completion":  # TRL's conversational prompt-completion: the loss on the completion only
        rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
                for p, a in zip(prompts, answers)]
    else:
        rows = [{"input_ids": tokenizer(f"{p} {a}").input_ids + [tokenizer.eos_token_id]}
                for p, a in zip(prompts, answers)]
    return Dataset.from_list(rows)


def tiny_llama(tokenizer, method: str | None = "bidora", seed: int = 0, **adapter) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    if method is not None:
        settings = dict(method=method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        settings.update(adapter)
        loralib.apply_adapters(model, loralib.AdapterConfig(**settings))
    return model


def config(out, **kw) -> BiDoRASFTConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=5e-3, max_steps=3,
                logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no",
                upper_fraction=FRACTION, max_length=MAX_LENGTH)
    base.update(kw)
    return BiDoRASFTConfig(**base)


def raw_upper_rows(raw: Dataset, seed: int = 0) -> Dataset:
    """The rows BiDoRA holds out, computed independently of the trainer."""
    return raw.select(split_indices(len(raw), FRACTION, seed)[1])


# ---- the arguments ---------------------------------------------------------------------------------------------
def test_config_defaults_are_reconciled_and_written_down(tmp_path):
    assert BiDoRASFTConfig.__mro__[1:4] == (BiDoRATrainingArguments, SFTConfig, SFTConfig.__mro__[1])
    trl_defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    assert trl_defaults["bf16"] is None and trl_defaults["gradient_checkpointing"] is True  # what TRL would do
    assert trl_defaults["average_tokens_across_devices"] is True

    args = BiDoRASFTConfig(output_dir=str(tmp_path), report_to="none")  # a CPU machine, no use_cpu needed
    assert (args.bf16, args.fp16, args.gradient_checkpointing, args.average_tokens_across_devices) == (
        is_torch_bf16_gpu_available(), False, False, False)
    assert (args.learning_rate, args.logging_steps) == (2e-5, 10)  # TRL's, not transformers' 5e-5 / 500
    assert (args.max_length, args.dataset_text_field, args.upper_fraction, args.hypergradient) == (
        1024, "text", 0.2, "darts")  # both parents' own fields
    assert BiDoRASFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is False

    on = BiDoRASFTConfig(output_dir=str(tmp_path), activation_checkpointing=True, report_to="none")
    assert on.gradient_checkpointing_kwargs == {"use_reentrant": False}
    asked = BiDoRASFTConfig(output_dir=str(tmp_path), activation_checkpointing=True, report_to="none",
                            activation_checkpointing_kwargs={"use_reentrant": True})
    assert asked.gradient_checkpointing_kwargs == {"use_reentrant": True}  # the user's choice is kept

    (parsed,) = HfArgumentParser(BiDoRASFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--upper_fraction", "0.3", "--max_length", "64", "--packing", "--use_cpu",
         "--report_to", "none"])
    assert (parsed.upper_fraction, parsed.max_length, parsed.packing, parsed.bf16) == (0.3, 64, True, False)
    with pytest.raises(ValueError, match="upper_fraction"):
        BiDoRASFTConfig(output_dir=str(tmp_path), upper_fraction=1.0)


# ---- the upper split is prepared as SFTTrainer prepares train --------------------------------------------------
def sft_prepared(rows: Dataset, tokenizer, out, **kw) -> Dataset:
    """SFTTrainer's own preparation of ``rows`` as a train split, in a plain SFTTrainer of its own."""
    args = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False,
                     report_to="none", max_length=MAX_LENGTH, **kw)
    return SFTTrainer(model=tiny_llama(tokenizer, method=None), args=args, train_dataset=rows,
                      processing_class=tokenizer).train_dataset


def columns(dataset: Dataset) -> dict[str, list]:
    return {c: dataset[c] for c in ("input_ids", "labels", "seq_lengths") if c in dataset.column_names}


@pytest.mark.parametrize("fmt, source, packing", [
    ("messages", "fraction", False), ("text", "fraction", False), ("input_ids", "fraction", False),
    ("prompt_completion", "fraction", False), ("messages", "fraction", True), ("text", "upper_dataset", False)])
def test_upper_rows_are_tokenised_as_sft_tokenises_train(tmp_path, tokenizer, fmt, source, packing):
    raw = raw_dataset(fmt, tokenizer)
    kw = {"packing": True, "eval_packing": False} if packing else {}  # the upper split follows packing, not eval's
    if source == "fraction":
        trainer = BiDoRASFTTrainer(model=tiny_llama(tokenizer), args=config(tmp_path, **kw), train_dataset=raw,
                                   processing_class=tokenizer)
        upper = raw_upper_rows(raw)
    else:
        upper = raw_dataset(fmt, tokenizer, n=6)
        trainer = BiDoRASFTTrainer(model=tiny_llama(tokenizer), args=config(tmp_path, **kw), train_dataset=raw,
                                   upper_dataset=upper, processing_class=tokenizer)
    assert columns(trainer.upper_dataset) == columns(sft_prepared(upper, tokenizer, tmp_path / "sft", **kw))
    lower_rows = len(raw) - len(upper) if source == "fraction" else len(raw)  # carved out of train, or all of it
    assert packing or len(trainer.train_dataset) == lower_rows  # (packing joins rows)
    if fmt == "messages" and not packing:  # and by hand: the chat template, cut at max_length, labels = ids
        by_hand = [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"][:MAX_LENGTH]
                   for r in upper]
        assert trainer.upper_dataset["input_ids"] == by_hand == trainer.upper_dataset["labels"]
    if packing:  # the held-out evaluation is prepared as evaluation data (eval_packing=False), the upper level not
        assert "seq_lengths" in trainer.upper_dataset.column_names
        assert "seq_lengths" not in trainer.eval_dataset["heldout"].column_names
    batch = trainer._model_columns(trainer.upper_dataset)
    assert set(batch.column_names) <= {"input_ids", "labels", "seq_lengths"}
    if fmt == "prompt_completion":  # the prompt's tokens carry no loss, as in SFTTrainer's train rows
        for row in trainer.upper_dataset:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
            n = len(prompt["input_ids"])
            assert row["input_ids"][:n] == prompt["input_ids"] and set(row["labels"][:n]) == {-100}
            assert row["labels"][n:] == row["input_ids"][n:]


# ---- both levels train -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, hypergradient, packing", [
    ("messages", "darts", False), ("text", "darts", False), ("input_ids", "darts", False),
    ("messages", "first_order", False), ("text", "darts", True)])
def test_bidora_trains_both_levels(tmp_path, tokenizer, fmt, hypergradient, packing):
    model = tiny_llama(tokenizer)
    before = snapshot(model)
    packed = {"packing": True, "upper_batch_size": 2} if packing else {}  # packing joins the 5 upper rows into 3
    trainer = BiDoRASFTTrainer(model=model, args=config(tmp_path, hypergradient=hypergradient, eval_strategy="steps",
                                                        eval_steps=3, **packed),
                               train_dataset=raw_dataset(fmt, tokenizer), processing_class=tokenizer)
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if ".lora_" in n or n.endswith("magnitude")}  # the base stays bitwise
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("upper_loss" in h and "mean_token_accuracy" in h for h in logs)
    assert any("eval_heldout_loss" in h for h in trainer.state.log_history)  # the upper split, evaluated


# ---- SFTTrainer's metrics and token counts are the lower steps' ------------------------------------------------
class Snapshot(TrainerCallback):
    """Copies SFTTrainer's recorded state at every step end (before or after the upper step, by its place)."""

    def __init__(self) -> None:
        self.trainer, self.seen = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((copy.deepcopy(dict(self.trainer._metrics["train"])), self.trainer._total_train_tokens))


class NoUpperStep(BiDoRASFTTrainer):
    def upper_step(self) -> None:  # the same lower steps, no upper level
        pass


def test_upper_and_darts_evaluations_leave_sft_metrics_and_token_counts_alone(tmp_path, tokenizer):
    raw = raw_dataset("messages", tokenizer)
    before_upper, after_upper = Snapshot(), Snapshot()
    trainer = BiDoRASFTTrainer(model=tiny_llama(tokenizer), args=config(tmp_path / "a", logging_steps=2),
                               train_dataset=raw, processing_class=tokenizer, callbacks=[before_upper])
    trainer.add_callback(after_upper)  # after the upper step's callback
    before_upper.trainer = after_upper.trainer = trainer
    counted = []
    trainer.training_step = _counting(trainer.training_step, counted)
    trainer.train()
    assert len(after_upper.seen) == 3 and after_upper.seen == before_upper.seen  # darts' evaluations included
    assert [tokens for _, tokens in after_upper.seen] == list(itertools.accumulate(counted))
    assert [len(metrics["entropy"]) for metrics, _ in after_upper.seen] == [1, 2, 1]  # one per lower step

    lower_only = NoUpperStep(model=tiny_llama(tokenizer), args=config(tmp_path / "b", logging_steps=2),
                             train_dataset=raw, processing_class=tokenizer)
    lower_only.train()

    def logged(t, key):
        return [h[key] for h in t.state.log_history if "loss" in h]

    assert logged(trainer, "num_tokens") == logged(lower_only, "num_tokens")
    assert "upper_loss" in trainer.state.log_history[0] and "upper_loss" not in lower_only.state.log_history[0]


def _counting(training_step, counted: list[int]):
    """``training_step`` that records the tokens of each lower batch (the attention mask's sum)."""
    def step(model, inputs, num_items_in_batch=None):
        counted.append(int(inputs["attention_mask"].sum()))
        return training_step(model, inputs, num_items_in_batch)
    return step


# ---- the upper loss is the causal-LM loss --------------------------------------------------------------------
def test_upper_loss_at_step_0_is_the_causal_lm_loss_by_hand(tmp_path, tokenizer):
    raw = raw_dataset("messages", tokenizer)
    model = tiny_llama(tokenizer).double()
    trainer = BiDoRASFTTrainer(model=model, args=config(tmp_path), train_dataset=raw, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.create_scheduler(num_training_steps=3)  # builds the upper level as at a train start
    rows = raw_upper_rows(raw).select(trainer.upper_stream._epoch_batches()[0])  # the stream's first batch

    ids = [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"][:MAX_LENGTH] for r in rows]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # the plain forward: full float64 logits
    labels = input_ids.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))

    lower_rows = trainer._model_columns(trainer.train_dataset)
    trainer._lower_batch = trainer.data_collator([lower_rows[i] for i in range(BATCH)])
    model.train()
    with magnitudes_trainable(model, False):
        trainer.upper_step()
    assert logits.dtype == torch.float64
    assert trainer._upper_losses[0] == pytest.approx(expected.item(), rel=2e-7)  # the float32 it is reported in


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_and_resume_end_where_an_uninterrupted_run_ends(tmp_path, tokenizer):
    raw = raw_dataset("messages", tokenizer)

    def run(out, resume=None, **kw):
        model = tiny_llama(tokenizer, lora_dropout=0.1)
        trainer = BiDoRASFTTrainer(model=model, args=config(out, max_steps=4, save_strategy="steps", save_steps=2),
                                   train_dataset=raw, processing_class=tokenizer, **kw)
        trainer.train(resume_from_checkpoint=resume)
        return snapshot(model)

    full = run(tmp_path / "full")
    run(tmp_path / "cut", callbacks=[StopAt(2)])
    assert (tmp_path / "cut" / "checkpoint-2" / "bilevel_state.pt").is_file()
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert all(torch.equal(resumed[name], value) for name, value in full.items())


# ---- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["second_order", "lm_head", "plain_args", "model_name", "peft_config", "iterable"])
def test_what_sft_cannot_do_is_refused_with_a_sentence(tmp_path, tokenizer, case):
    raw = raw_dataset("text", tokenizer)
    model, kw, args = tiny_llama(tokenizer), {}, config(tmp_path)
    error, match = ValueError, None
    if case == "second_order":
        args, match = config(tmp_path, hypergradient="neumann"), "fused LM head"
    elif case == "lm_head":
        model, match = tiny_llama(tokenizer, target_modules=["q_proj", "lm_head"]), "lm_head"
    elif case == "plain_args":
        args = BiDoRATrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        error, match = TypeError, "BiDoRASFTConfig"
    elif case == "model_name":
        model, error, match = "some/model", TypeError, "apply the adapters first"
    elif case == "peft_config":
        kw, match = {"peft_config": object()}, "loralib.apply_adapters"
    else:  # the upper split is drawn by index
        raw, match = raw.to_iterable_dataset(), "IterableDataset"
    with pytest.raises(error, match=match):
        BiDoRASFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer, **kw)


def test_label_smoothing_loss_allows_a_second_order_hypergradient(tmp_path, tokenizer):
    """With label smoothing SFTTrainer's loss comes from full logits, which can be differentiated twice."""
    model = tiny_llama(tokenizer)
    before = snapshot(model)
    with pytest.warns(FutureWarning, match="label_smoothing_factor"):
        trainer = BiDoRASFTTrainer(model=model, args=config(tmp_path, hypergradient="neumann", max_steps=1,
                                                            label_smoothing_factor=0.1, neumann_alpha=0.1),
                                   train_dataset=raw_dataset("text", tokenizer), processing_class=tokenizer)
    trainer.train()
    assert any(n.endswith("magnitude") and not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_model_without_adapters_is_said_to_train_as_full_fine_tuning(tmp_path, tokenizer):
    raw = raw_dataset("text", tokenizer)
    with pytest.warns(UserWarning, match="no loralib adapters: BiDoRASFTTrainer trains it as full fine-tuning"):
        trainer = BiDoRASFTTrainer(model=tiny_llama(tokenizer, method=None), args=config(tmp_path),
                                   train_dataset=raw, processing_class=tokenizer)
    assert trainer.method == "ft" and len(trainer.train_dataset) == len(raw) and trainer.upper_dataset is None


def test_loralib_imports_without_trl_and_names_the_install():
    assert not {"BiDoRASFTTrainer", "BiDoRASFTConfig"} & set(loralib.__all__)  # `from loralib import *` needs no trl
    script = (
        "import sys; sys.modules['trl'] = None\n"
        "import loralib\n"
        "assert loralib.AdapterConfig is not None\n"
        "try:\n"
        "    loralib.BiDoRASFTTrainer\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'trl>=1.16,<2'" in out.stdout


def test_a_plain_combination_leaves_the_upper_split_raw_and_this_one_does_not(tmp_path, tokenizer):
    """The fault this module fixes: ``class X(BiDoRATrainer, SFTTrainer)`` never tokenises the upper split, and its
    first upper step fails inside the collator or the dataset (IndexError, or ZeroDivisionError once the raw
    ``messages`` column is dropped)."""
    class Plain(BiDoRATrainer, SFTTrainer):
        pass

    raw = raw_dataset("messages", tokenizer)
    plain = Plain(model=tiny_llama(tokenizer), args=config(tmp_path), train_dataset=raw, processing_class=tokenizer)
    assert "input_ids" not in plain.upper_dataset.column_names
    ours = BiDoRASFTTrainer(model=tiny_llama(tokenizer), args=config(tmp_path), train_dataset=raw,
                            processing_class=tokenizer)
    assert "input_ids" in ours.upper_dataset.column_names


def test_trl_metrics_are_named_by_split_as_a_plain_sft_trainer_measures_them(tmp_path, tokenizer):
    """With the heldout and validation splits, TRL's metrics keep the split in their name (SFTTrainer would write both
    as eval_mean_token_accuracy, the second overwriting the first); each equals a plain SFTTrainer's on that split."""
    raw, validation = raw_dataset("messages", tokenizer), raw_dataset("messages", tokenizer, n=6)
    model = tiny_llama(tokenizer)
    trainer = BiDoRASFTTrainer(model=model, args=config(tmp_path / "ours"), train_dataset=raw,
                               eval_dataset=validation, processing_class=tokenizer)
    trainer.train()
    ours = trainer.evaluate()
    assert not {"eval_mean_token_accuracy", "eval_entropy"} & set(ours)
    plain_args = SFTConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", bf16=False,
                           max_length=MAX_LENGTH, per_device_eval_batch_size=trainer.args.per_device_eval_batch_size)
    for split, rows in (("heldout", raw_upper_rows(raw)), ("validation", validation)):
        plain = SFTTrainer(model=model, args=plain_args, train_dataset=rows, eval_dataset=rows,
                           processing_class=tokenizer).evaluate()
        for metric in ("mean_token_accuracy", "entropy", "loss"):
            assert ours[f"eval_{split}_{metric}"] == pytest.approx(plain[f"eval_{metric}"], rel=1e-6), (split, metric)
