"""Fine-tune an encoder for token classification (NER) with ft, LoRA, DoRA or BiDoRA.

    python examples/NER/run_ner.py --model_name_or_path roberta-base --dataset_name eriktks/conll2003 \
        --dataset_revision refs/convert/parquet --method bidora --learning_rate 5e-4 --num_train_epochs 10 \
        --output_dir runs/ner/conll2003/bidora/seed0 --seed 0
    python examples/NER/run_ner.py --model_name_or_path <folder> --train_file train.txt \
        --validation_file validation.txt --test_file test.txt --method lora --output_dir runs/x
    python examples/NER/run_ner.py --help        # every option

Laid out like transformers' own ``run_ner.py``: ``HfArgumentParser`` over ``ModelArguments``,
``DataTrainingArguments``, ``loralib.AdapterConfig`` itself (every adapter option, the library's defaults;
``--method`` adds ``ft``, full fine-tuning), ``RunArguments`` (this runner's own) and
``loralib.BiDoRATrainingArguments`` (every Trainer option and the bi-level ones). Data: CoNLL-format files by path
(``ner_data.read_conll``: one token per line, tag in the last column, a blank line between sentences,
``-DOCSTART-`` skipped, read line by line so that tokens like ``NA`` stay strings) or a script-free hub dataset with
``tokens`` / ``ner_tags`` columns (``datasets.load_dataset``). Word labels go to the first subword of each word
(``-100`` elsewhere; ``--label_all_tokens`` labels every subword, ``B-X`` continuing as ``I-X``); byte-level BPE
tokenizers (RoBERTa, GPT-2) read the pre-split words with ``add_prefix_space=True``, set by default when the
tokenizer's pre-tokenizer is byte-level.

One ``loralib.BiDoRATrainer`` runs every method. A seeded ``upper_fraction`` (20%) of train, whole sentences, is held
out for every method: BiDoRA's magnitudes train on it, and it is the ``heldout`` split every method is evaluated on
and selected on (``load_best_model_at_end`` with ``metric_for_best_model f1``, i.e. ``heldout_f1``); the baselines
hold out ``--heldout_fraction`` instead when given (0: train on all of train, report the final model). No option
selects on a test split.

Metrics: entity-level precision / recall / F1 by ``seqeval`` (conlleval's exact-match rule) and token accuracy.
During training (selection) they are computed on the labelled subword positions; the final numbers in
``results.json`` are word level, over every word of every sentence of the split (a word that truncation cut off
counts as predicted ``O``; ``words_without_prediction`` says how many there were).

Writes ``output_dir/results.json`` (method, seed, selection, final metrics per split, history, config, sizes),
transformers' ``all_results.json`` and ``<split>_results.json``, ``adapter/`` (``loralib.save_adapters``: PEFT's
format with a model card; ``model/`` for ft), ``run_config.json``, ``predictions_<split>.txt`` with
``--do_predict`` (token, gold tag, predicted tag). Checkpoints while running; the same command resumes an unfinished
run; a finished one is refused unless ``--overwrite_output_dir``. Exit status: 0 done, 1 bad input (one ``error:``
line), 2 bad command line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))  # examples/: run_common
sys.path.insert(0, str(_HERE))

import numpy as np  # noqa: E402
from ner_data import ConllError, align_labels, first_subwords, inside_of, label_list, read_conll  # noqa: E402
from ner_metrics import entity_scores, make_compute_metrics  # noqa: E402
from run_common import (  # noqa: E402
    HUB_SPLITS,
    RunArguments,
    RunError,
    check_model_folder,
    check_output_dir,
    finish_run,
    first_line,
    flat_config,
    held_out_fraction,
    load_hub_dataset,
    logits_of,
    package_versions,
    parse_groups,
    position_limit,
    script_parser,
    selection_split,
    shared_problem,
    start_runtime,
    train_and_select,
)
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    HfArgumentParser,
    set_seed,
)

import loralib  # noqa: E402
from loralib import BiDoRATrainer, BiDoRATrainingArguments  # noqa: E402
from loralib.config import METHODS as ADAPTER_METHODS  # noqa: E402
from loralib.data import split_indices  # noqa: E402
from loralib.files import atomic_write_text  # noqa: E402

METHODS = ("ft", *ADAPTER_METHODS)
SPLITS = ("train", "validation", "test")
# This script's defaults for Trainer options, and for modules_to_save: the token-classification head (a module named
# classifier in BERT / RoBERTa / DeBERTa) is new and always trains.
SCRIPT_DEFAULTS = dict(do_train=True, do_eval=True, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
                       logging_steps=50, load_best_model_at_end=True, metric_for_best_model="f1",
                       modules_to_save=["classifier"])
#: The packages whose versions results.json records
VERSIONED = ("torch", "transformers", "datasets", "tokenizers", "seqeval", "loralib-bidora")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hugging Face id of the pretrained encoder."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or id, if not the "
                                                                       "model's."})
    add_prefix_space: bool | None = field(default=None, metadata={
        "help": "Read every pre-split word as if preceded by a space (byte-level BPE: RoBERTa, GPT-2). Default: on "
        "exactly when the tokenizer's pre-tokenizer is byte-level."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Start a fresh head when the checkpoint already has a token-classification head of another size "
        "(a model fine-tuned on other labels)."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (script-free: parquet / json) "
                                     "with tokens and ner_tags columns, read by datasets.load_dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Its revision (e.g. refs/convert/parquet, "
                                         "the hub's parquet export of a script dataset)."})
    train_file: str | None = field(default=None, metadata={"help": "CoNLL-format training file (token ... tag per "
                                   "line, blank line between sentences); with any file only files are read."})
    validation_file: str | None = field(default=None, metadata={"help": "CoNLL-format dev file."})
    test_file: str | None = field(default=None, metadata={"help": "CoNLL-format test file."})
    text_column_name: str = field(default="tokens", metadata={"help": "Hub dataset: column of the words."})
    label_column_name: str = field(default="ner_tags", metadata={"help": "Hub dataset: column of the tags (class "
                                   "ids with names, or tag strings)."})
    max_seq_length: int = field(default=256, metadata={"help": "Subword tokens per sentence, special tokens "
                                "included (longer sentences are truncated; their cut words count as O)."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every sentence to max_seq_length "
                                    "instead of each batch to its longest."})
    label_all_tokens: bool = field(default=False, metadata={"help": "Label every subword of a word (B-X continues "
                                   "as I-X) instead of the first only; training and selection metrics then count "
                                   "subwords, the final word-level metrics do not change their rule."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training sentences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N dev sentences."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test sentences."})
    return_entity_level_metrics: bool = field(default=False, metadata={"help": "Also report precision, recall, F1 "
                                              "and support per entity type."})

    def __post_init__(self) -> None:
        files = (self.train_file, self.validation_file, self.test_file)
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("give --dataset_name or --train_file")
        if self.dataset_name is not None and any(files):
            raise ValueError("give --dataset_name or local files (--train_file ...), not both")
        if self.max_seq_length < 3:
            raise ValueError(f"--max_seq_length must be >= 3, got {self.max_seq_length}")


def make_parser() -> HfArgumentParser:
    return script_parser(
        (ModelArguments, DataTrainingArguments, loralib.AdapterConfig, RunArguments, BiDoRATrainingArguments),
        __doc__.split("\n")[0], SCRIPT_DEFAULTS, METHODS, "ft (full fine-tuning: no adapter, every weight trains)",
        {"upper_fraction": "Held-out share of train (whole sentences, seeded): BiDoRA's upper split, and for ft, lora "
                           "and dora the selection split unless --heldout_fraction is given."})


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, adapter_config, run_args, training_args)``; exits with status 2 and a message on a
    bad command line. For ``--method ft`` no adapter is applied (``run_args.method`` says so; the adapter options are
    still checked, with ``adapter_config.method`` then ``lora``)."""
    parser = make_parser()
    groups, method = parse_groups(parser, argv, ("ft",))
    model_args, data_args, adapter_config, run_args, args = groups
    run_args.method = method
    problem = shared_problem(method, args) or (
        "--do_train false: this script trains one run (evaluate a saved adapter with loralib.load_adapters)"
        if not args.do_train else None
    )
    if problem:
        parser.error(problem)
    return model_args, data_args, adapter_config, run_args, args


# ---- data ---------------------------------------------------------------------------------------------------------
def load_raw_splits(data_args: DataTrainingArguments) -> tuple[dict[str, dict[str, list]], list[str], str]:
    """``({split: {"tokens": [[word]], "ner_tags": [[tag]]}}, labels, source)`` from CoNLL files or the hub."""
    if data_args.train_file is not None:
        splits = {}
        for name, path in zip(SPLITS, (data_args.train_file, data_args.validation_file, data_args.test_file)):
            if path is not None:
                sentences = read_conll(path)
                if not sentences:
                    raise RunError(f"--{name}_file {path} holds no sentence")
                splits[name] = {"tokens": [s["tokens"] for s in sentences],
                                "ner_tags": [s["ner_tags"] for s in sentences]}
        labels = label_list(tags for split in splits.values() for tags in split["ner_tags"])
        return splits, labels, "files " + ", ".join(str(p) for p in (data_args.train_file, data_args.validation_file,
                                                                      data_args.test_file) if p)
    return load_hub_splits(data_args)


def load_hub_splits(data_args: DataTrainingArguments):
    """The hub dataset's train / validation (or dev) / test splits, tags as strings (class names when the column is a
    list of ``ClassLabel``), and its label list (the class names in their order, else the sorted tag set)."""
    import datasets

    raw = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)
    splits, class_names = {}, None
    for hub_name, dataset in raw.items():
        if hub_name not in HUB_SPLITS:
            continue
        for column in (data_args.text_column_name, data_args.label_column_name):
            if column not in dataset.column_names:
                raise RunError(f"dataset {data_args.dataset_name!r} split {hub_name!r} has no column {column!r} "
                               f"(columns: {', '.join(dataset.column_names)}); use --text_column_name / "
                               "--label_column_name")
        inner = getattr(dataset.features[data_args.label_column_name], "feature", None)
        tags = dataset[data_args.label_column_name]
        if isinstance(inner, datasets.ClassLabel):
            class_names = list(inner.names)
            tags = [[class_names[t] for t in row] for row in tags]
        elif tags and tags[0] and not isinstance(tags[0][0], str):
            raise RunError(f"column {data_args.label_column_name!r} holds class ids without names; use a dataset "
                           "whose tags are strings or a list of ClassLabel")
        splits[HUB_SPLITS[hub_name]] = {"tokens": [list(map(str, row)) for row in dataset[data_args.text_column_name]],
                                   "ner_tags": [list(row) for row in tags]}
    if "train" not in splits:
        raise RunError(f"dataset {data_args.dataset_name!r} has no train split (splits: {', '.join(raw)})")
    labels = class_names or label_list(t for split in splits.values() for t in split["ner_tags"])
    source = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
    return splits, labels, source


def select_first(split: dict[str, list], n: int | None) -> dict[str, list]:
    return split if n is None else {k: v[:n] for k, v in split.items()}


def byte_level(tokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer is (or contains) byte-level BPE's, which reads a word differently at
    the start of a text than after a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return any(node.get("type") == "ByteLevel" for node in _nodes(json.loads(backend.to_str()).get("pre_tokenizer")))


def _nodes(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def set_prefix_space(tokenizer) -> None:
    """``add_prefix_space=True`` on the backend's byte-level pre-tokenizer itself. Not every tokenizer class passes
    the ``from_pretrained`` keyword on to the backend (transformers 5's generic ``PreTrainedTokenizerFast`` only
    stores it), so the pre-tokenizer is rebuilt with it from its own serialisation."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())
    for node in _nodes(state.get("pre_tokenizer")):
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = True
    backend.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer
    tokenizer.add_prefix_space = True


def load_tokenizer(model_args: ModelArguments):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    check_model_folder(name, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
                       needs_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as err:
        raise RunError(f"cannot load the tokenizer of {name!r}: {first_line(err)}") from None
    if not tokenizer.is_fast:
        raise RunError(f"the tokenizer of {name!r} is not a fast tokenizer: word-to-subword alignment needs "
                       "word_ids(), which only fast (tokenizers-backed) tokenizers give")
    prefix = byte_level(tokenizer) if model_args.add_prefix_space is None else model_args.add_prefix_space
    if prefix:
        if not byte_level(tokenizer):
            raise RunError(f"--add_prefix_space: the tokenizer of {name!r} has no byte-level pre-tokenizer to set it "
                           "on")
        set_prefix_space(tokenizer)
    return tokenizer


def tokenize_split(split: dict[str, list], tokenizer, label_to_id: dict[str, int], data_args, inside: list[int]):
    """``(datasets.Dataset of input_ids / attention_mask / [token_type_ids] / labels, word_ids per sentence)``."""
    import datasets

    words = split["tokens"]
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data_args.max_seq_length,
                        padding="max_length" if data_args.pad_to_max_length else False)
    word_ids, labels = [], []
    for i, tags in enumerate(split["ner_tags"]):
        ids = encoded.word_ids(i)
        word_ids.append(ids)
        labels.append(align_labels(ids, [label_to_id[t] for t in tags], data_args.label_all_tokens, inside))
    columns = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    return datasets.Dataset.from_dict({**columns, "labels": labels}), word_ids


def prepare_data(data_args: DataTrainingArguments, tokenizer, seed: int, fraction: float):
    """Read, split off the held-out sentences, tokenise and align. Returns ``(labels, source, splits)`` with
    ``splits[name] = (dataset, word_ids, words, tags)`` for train (all), lower, heldout, validation, test."""
    raw, labels, source = load_raw_splits(data_args)
    raw["train"] = select_first(raw["train"], data_args.max_train_samples)
    for name, limit in (("validation", data_args.max_eval_samples), ("test", data_args.max_predict_samples)):
        if name in raw:
            raw[name] = select_first(raw[name], limit)
    for name, split in raw.items():  # an empty sentence (a stray blank in a hub dataset) has nothing to label
        keep = [i for i, words in enumerate(split["tokens"]) if words]
        if len(keep) < len(split["tokens"]):
            print(f"note: {len(split['tokens']) - len(keep)} empty sentence(s) dropped from {name}", file=sys.stderr)
            raw[name] = {k: [v[i] for i in keep] for k, v in split.items()}
    if fraction > 0:
        lower_idx, upper_idx = split_indices(len(raw["train"]["tokens"]), fraction, seed)
        if not lower_idx or not upper_idx:
            raise RunError(f"cannot hold out {fraction:.0%} of {len(raw['train']['tokens'])} training sentences")
        raw["lower"] = {k: [v[i] for i in lower_idx] for k, v in raw["train"].items()}
        raw["heldout"] = {k: [v[i] for i in upper_idx] for k, v in raw["train"].items()}
    label_to_id, inside = {name: i for i, name in enumerate(labels)}, inside_of(labels)
    unknown = sorted({t for split in raw.values() for tags in split["ner_tags"] for t in tags} - set(label_to_id))
    if unknown:
        raise RunError(f"tags outside the label list {labels}: {unknown}")
    out = {}
    for name, split in raw.items():
        dataset, word_ids = tokenize_split(split, tokenizer, label_to_id, data_args, inside)
        out[name] = (dataset, word_ids, split["tokens"], split["ner_tags"])
    return labels, source, out


# ---- model --------------------------------------------------------------------------------------------------------
def build_model(model_args: ModelArguments, labels: list[str], adapter_config: loralib.AdapterConfig | None):
    """The pretrained encoder with a fresh token-classification head, and the adapters (None: ft)."""
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(labels),
                                            id2label=dict(enumerate(labels)),
                                            label2id={name: i for i, name in enumerate(labels)})
        model = AutoModelForTokenClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    except Exception as err:  # missing / damaged weight files: transformers and safetensors errors of several kinds
        raise RunError(f"cannot load the model {model_args.model_name_or_path!r}: {first_line(err)}") from None
    if adapter_config is not None:
        print(loralib.apply_adapters(model, adapter_config), file=sys.stderr)
    return model


# ---- evaluation ---------------------------------------------------------------------------------------------------
def word_predictions(logits: np.ndarray, word_ids: list, n_words: list[int], labels: list[str]) -> list[list[str]]:
    """A tag per word: the prediction at the word's first subword, ``O`` for a word without a subword."""
    ids = logits.argmax(-1)
    out = []
    for row, positions, n in zip(ids, word_ids, n_words):
        first = first_subwords(positions)
        out.append([labels[row[first[w]]] if w in first else "O" for w in range(n)])
    return out


def evaluate_split(trainer, name: str, split, labels: list[str], per_type: bool):
    """Word-level metrics (and the loss) of one split, and the predicted tags."""
    dataset, word_ids, words, gold = split
    output = trainer.predict(dataset, metric_key_prefix=name)
    predicted = word_predictions(np.asarray(logits_of(output)), word_ids, [len(w) for w in words], labels)
    metrics = entity_scores(gold, predicted, per_type=per_type)
    metrics["loss"] = float(output.metrics.get(f"{name}_loss", float("nan")))
    return metrics, predicted


def write_predictions(path: Path, words, gold, predicted) -> None:
    lines = []
    for sentence in zip(words, gold, predicted):
        lines += [f"{w}\t{g}\t{p}" for w, g, p in zip(*sentence)] + [""]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---- the run ------------------------------------------------------------------------------------------------------
def run(model_args, data_args, adapter_config, run_args, args) -> dict:
    out, method = Path(args.output_dir), run_args.method
    check_model_folder(model_args.model_name_or_path)  # a wrong local path: one sentence, before anything
    resume = check_output_dir(out, run_args.overwrite_output_dir, ("predictions_*.txt",))
    tokenizer = load_tokenizer(model_args)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    limit = position_limit(config)
    if limit is not None and data_args.max_seq_length > limit:
        raise RunError(f"--max_seq_length {data_args.max_seq_length} is beyond the {limit} positions "
                       f"{model_args.model_name_or_path} can read; use --max_seq_length {limit} or less")
    fraction = held_out_fraction(method, args)
    data_seed = args.data_seed if args.data_seed is not None else args.seed
    labels, source, splits = prepare_data(data_args, tokenizer, data_seed, fraction)
    set_seed(args.seed)  # the head's initialisation depends on the seed only
    model = build_model(model_args, labels, None if method == "ft" else adapter_config)

    dev = {"validation": splits["validation"][0]} if "validation" in splits and args.do_eval else {}
    held = splits["heldout"][0] if "heldout" in splits else None
    # What is reported: the step best on held-out train data (or on the split --metric_for_best_model names), or the
    # final model (no held-out split, no evaluation, or --load_best_model_at_end false).
    split, metric = selection_split(args, held, dev, "f1",
                                    dev_hint=" (give --validation_file, or a dataset with a validation split)")
    selection = split or "final"

    collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if (args.bf16 or args.fp16)
                                                  else None)
    trainer = BiDoRATrainer(model=model, args=args, train_dataset=splits["lower" if held is not None else "train"][0],
                            eval_dataset=dev or None, upper_dataset=held, data_collator=collator,
                            processing_class=tokenizer,
                            compute_metrics=make_compute_metrics(labels, data_args.return_entity_level_metrics))
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.json", json.dumps(flat_config(model_args, data_args, adapter_config,
                                                                          run_args, args), indent=2))
        if held is not None:
            role = "BiDoRA's magnitudes train on it" if method == "bidora" else "ft / lora / dora do not train on it"
            print(f"holding out {fraction:.0%} of train ({len(held)} of {len(splits['train'][0])} sentences) as the "
                  f"heldout split: {role}; the model is selected on it", flush=True)
    train_result, selected_step, wall = train_and_select(trainer, args, out, resume)

    evaluated = [n for n in ("heldout", "validation", "test") if n in splits and (n != "validation" or args.do_eval)]
    results_eval, lost = {}, {}
    for name in evaluated:
        metrics, predicted = evaluate_split(trainer, name, splits[name], labels,
                                            data_args.return_entity_level_metrics)
        results_eval[name] = metrics
        lost[name] = sum(len(w) - len(first_subwords(ids)) for w, ids in zip(splits[name][2], splits[name][1]))
        trainer.save_metrics(name, {f"{name}_{k}": v for k, v in metrics.items()})
        if args.do_predict and args.process_index == 0:
            write_predictions(out / f"predictions_{name}.txt", splits[name][2], splits[name][3], predicted)
    if any(lost.values()):
        print(f"note: words without a prediction (cut off at --max_seq_length {data_args.max_seq_length}, or no "
              f"subword), counted as O: {lost}", file=sys.stderr)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results = {
        "task": "ner", "data": source, "model": model_args.model_name_or_path, "method": method,
        "rank": None if method == "ft" else adapter_config.r, "seed": args.seed, "labels": labels,
        "selection": selection, "selected_step": selected_step, "select_metric": metric,
        "steps": trainer.state.global_step, "eval": results_eval, "history": trainer.state.log_history,
        "config": flat_config(model_args, data_args, adapter_config, run_args, args),
        "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters()),
        "train_runtime_s": train_result.metrics.get("train_runtime"), "wall_time_s": wall,
        "world_size": args.world_size,
        "device": str(args.device), "versions": package_versions(VERSIONED),
        "data_sizes": {n: len(s[0]) for n, s in splits.items()}, "words_without_prediction": lost,
    }
    if args.process_index == 0:
        finish_run(out, results, model, tokenizer, full_model=method == "ft", adapted=method != "ft", data=source,
                   unit="sentences", keep_checkpoints=run_args.keep_checkpoints)
    return results


def main(argv: list[str] | None = None) -> int:
    groups = parse_args(argv)
    args = groups[-1]
    start_runtime(args)
    try:
        results = run(*groups)
    except (RunError, ConllError, ValueError, OSError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, metrics in results["eval"].items():
        print(f"{split}: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in ("precision", "recall", "f1", "accuracy")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
