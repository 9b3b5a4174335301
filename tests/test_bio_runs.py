"""End-to-end protein runs of examples/NLU/run_glue.py on a tiny ESM-2-shaped model (built from EsmConfig, saved as
if pretrained, with an EsmTokenizer from a vocab file written here), plus the AntiBERTy one-folder checkpoint of
examples/bio/antiberty_folder.py (the tokenizer must not turn residues into [UNK])."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

import loralib
from tests.helpers import load_example

ROOT = Path(__file__).resolve().parents[1]
import run_glue  # noqa: E402

HIDDEN, LAYERS, RANK = 16, 2, 2
# The ESM-2 vocabulary (order as in facebook/esm2_*): specials, residues by frequency, rare letters, mask.
ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>"]
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def _write_tiny_esm(path: Path) -> Path:
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(ESM_VOCAB) + "\n")
    tokenizer = EsmTokenizer(vocab_file=str(vocab))
    config = EsmConfig(vocab_size=len(ESM_VOCAB), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=70, pad_token_id=1, mask_token_id=32,
                       position_embedding_type="rotary", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    EsmForMaskedLM(config).save_pretrained(path)  # as ESM-2 is published: no task head
    tokenizer.save_pretrained(path)
    return path


def _write_csv(path: Path, rows: list[tuple[str, float | int]]) -> str:
    path.write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bio")
    model = _write_tiny_esm(root / "esm")
    rng = random.Random(0)
    seqs = ["".join(rng.choice(AMINO) for _ in range(rng.randint(6, 20))) for _ in range(56)]
    # Classes and targets depend on the lysine content, so there is something to learn.
    cls = [(s, int(s.count("K") + s.count("R") >= 2)) for s in seqs]
    reg = [(s, round((s.count("K") + s.count("R")) / len(s) * 4 + rng.gauss(0, 0.1), 4)) for s in seqs]
    files = {
        "cls": (_write_csv(root / "cls_train.csv", cls[:40]), _write_csv(root / "cls_test.csv", cls[40:])),
        "reg": (_write_csv(root / "reg_train.csv", reg[:40]), _write_csv(root / "reg_test.csv", reg[40:])),
    }
    return root, str(model), files


FAST = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--eval_steps", "2", "--learning_rate", "1e-3", "--r", str(RANK), "--lora_alpha", "4", "--max_length", "32",
        "--no_token_cache", "--disable_tqdm", "true", "--snapshots", "0", "--use_cpu", "true"]


def _run(assets, task: str, method: str, *extra: str) -> tuple[dict, Path]:
    root, model, files = assets
    train, test = files["cls" if task == "protein_classification" else "reg"]
    out = root / "runs" / task / method
    argv = ["--task_name", task, "--model_name_or_path", model, "--train_file", train, "--test_file", test,
            "--method", method, "--seed", "0", "--output_dir", str(out), *FAST, *extra]
    assert run_glue.main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def _head_params(num_labels: int) -> int:
    # EsmClassificationHead: dense (H x H + H) and out_proj (H x L + L).
    return HIDDEN * HIDDEN + HIDDEN + HIDDEN * num_labels + num_labels


@pytest.mark.parametrize("method", ["ft", "lora", "dora", "bidora"])
def test_protein_classification_every_method(assets, method):
    extra = ("--max_steps", "2", "--retrain_max_steps", "2") if method == "bidora" else ()
    results, out = _run(assets, "protein_classification", method, *extra)
    test = results["eval"]["test"]
    assert set(test) == {"accuracy", "precision_weighted", "recall_weighted", "f1_weighted"}
    assert all(0.0 <= v <= 1.0 for v in test.values())
    # Support-weighted recall is the accuracy, whatever the predictions (the paper's Table 4 shows it too).
    assert test["recall_weighted"] == pytest.approx(test["accuracy"], abs=1e-12)
    assert results["task"] == "protein_classification" and results["method"] == method
    if method == "ft":
        assert results["trainable_parameters"] == results["total_parameters"]
        return
    adapted = loralib.read_adapter_config(out / "adapter")["adapted_modules"]
    expected = {f"esm.encoder.layer.{i}.attention.self.{p}" for i in range(LAYERS) for p in ("query", "value")}
    assert set(adapted) == expected
    per_module = RANK * (HIDDEN + HIDDEN) + (HIDDEN if method in ("dora", "bidora") else 0)
    assert results["trainable_parameters"] == len(expected) * per_module + _head_params(2)
    if method == "bidora":
        phases = {h["phase"] for h in results["history"]}
        assert phases == {"search", "retrain"}
        assert any(h["split"] == "heldout" for h in results["history"])


def test_protein_regression_reports_mse(assets):
    results, _ = _run(assets, "protein_regression", "lora")
    test = results["eval"]["test"]
    assert {"mse", "neg_mse", "pearson", "spearman"} <= set(test)
    assert test["neg_mse"] == pytest.approx(-test["mse"])
    assert results["select_metric"] == "neg_mse" and results["paper_metric"] == "mse"
    assert results["trainable_parameters"] == 2 * LAYERS * RANK * 2 * HIDDEN + _head_params(1)


# --------------------------------------------------------------------------------------- AntiBERTy model folder

_HAS_ANTIBERTY = importlib.util.find_spec("antiberty") is not None


@pytest.mark.skipif(not _HAS_ANTIBERTY, reason="antiberty==0.1.3 not installed (make setup)")
def test_antiberty_folder_tokenizer_has_no_unk(tmp_path):
    folder_mod = load_example("bio_antiberty_folder", "examples/bio/antiberty_folder.py")
    folder = folder_mod.assemble_antiberty_folder(tmp_path / "antiberty")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "pytorch_model.bin"):
        assert (folder / name).exists(), name
    assert (folder / "pytorch_model.bin").resolve() == folder_mod.antiberty_paths().weights.resolve()

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = (folder / "vocab.txt").read_text().split()
    ids = tokenizer(" ".join(AMINO))["input_ids"]
    # [CLS] + one vocabulary id per residue, in vocab.txt order (an independent reading of the file) + [SEP].
    assert ids == [vocab.index("[CLS]"), *[vocab.index(a) for a in AMINO], vocab.index("[SEP]")]
    assert tokenizer.unk_token_id not in ids
    assert AutoConfig.from_pretrained(str(folder)).vocab_size == len(vocab)

    # The two traps the folder avoids are real: both make the check fail.
    (folder / "tokenizer_config.json").unlink()  # do_lower_case defaults to True: every residue [UNK]
    with pytest.raises(ValueError, match="UNK"):
        folder_mod.check_antiberty_folder(folder)
    with pytest.raises(ValueError, match="only 5 tokens"):  # the model folder alone has no vocab.txt
        folder_mod.check_antiberty_folder(folder_mod.antiberty_paths().model_dir)


def test_antiberty_folder_refuses_a_file(tmp_path):
    folder_mod = load_example("bio_antiberty_folder", "examples/bio/antiberty_folder.py")
    target = tmp_path / "x"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        folder_mod.assemble_antiberty_folder(target)


# ------------------------------------------------------------------------------------------ ESM Table 4 scripts


def test_esm_script_refuses_missing_data(tmp_path):
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "TRAIN_FILE": str(tmp_path / "absent.csv"), "TEST_FILE": str(tmp_path / "x.csv")}
    proc = subprocess.run(["bash", str(ROOT / "examples/bio/esm2_650m_bbp.sh")], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs its data as CSV files" in proc.stderr and "sequence,label" in proc.stderr


def test_esm_script_dry_run_plans_every_run(assets, tmp_path):
    import subprocess

    _, _, files = assets
    train, test = files["cls"]
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "SEEDS": "3 4", "METHODS": "ft bidora", "ESM_SIZE": "8M",
           "EPOCHS": "2", "OUT_ROOT": str(tmp_path / "out"), "EXTRA_ARGS": "--logging_steps 7"}
    proc = subprocess.run(["bash", str(ROOT / "examples/bio/esm2_650m_bbp.sh"), train, test], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "run_glue.py" in line]
    assert len(runs) == 4
    # 40 training rows, 8 held out: 2 epochs of 32 at batch 16 = 4 steps; retraining 2 epochs of 40 = 5 steps.
    bidora = [r for r in runs if "--method bidora" in r]
    assert all("--max_steps 4" in r and "--retrain_max_steps 5" in r for r in bidora)
    ft = [r for r in runs if "--method ft" in r]
    assert all("--max_steps 4" in r and "--learning_rate 2e-5" in r and "retrain" not in r for r in ft)
    assert all("facebook/esm2_t6_8M_UR50D" in r and "configs/esm2_bbp.yaml" in r for r in runs)
    assert "utils/report.py" in proc.stdout and "ESTIMATE" in proc.stderr
    assert all(r.endswith("--logging_steps 7") for r in runs) and "overridden by EXTRA_ARGS: --logging_steps 7" in \
        proc.stderr
