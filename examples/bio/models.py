"""Protein language models for the bio example: checkpoints, tokenizers, input format and adapter targets.

Two families:

* ``"esm"`` -- ESM-2 (``facebook/esm2_*`` on the Hugging Face hub; not available offline). ``EsmTokenizer`` reads
  the raw residue string (``"ACDW"``). Attention projections are ``...attention.self.{query,key,value}`` in
  ``EsmSelfAttention``; the sequence-classification head is ``classifier`` (``EsmClassificationHead``:
  ``classifier.dense``, ``classifier.out_proj``).
* ``"antiberty"`` -- AntiBERTy (``antiberty==0.1.3`` ships it: a BERT, 8 layers, hidden 512, 25-token vocabulary of
  5 specials + 20 residues). Its tokenizer is a WordPiece ``BertTokenizer`` that only knows single residues, so
  the residues must be separated by spaces (``"A C D W"``); an unspaced string becomes one ``[UNK]``. Module
  names are BERT's (``bert.encoder.layer.N.attention.self.{query,value}``); the head is ``classifier``.

Tokenizer traps (transformers 5), both caught by :func:`assert_tokenizer_covers_residues`:

* ``BertTokenizer(vocab_file=...)`` silently builds a 5-token vocabulary ([PAD], [UNK], [CLS], [SEP], [MASK]):
  every residue becomes [UNK]. Use ``BertTokenizer.from_pretrained(<folder>, do_lower_case=False)``.
* ``do_lower_case`` defaults to True: residues are lower-cased and all become [UNK] although
  ``convert_tokens_to_ids`` still looks fine.

Weights. AntiBERTy's weights are ``pytorch_model.bin`` (a pickle). ``from_pretrained`` in transformers 5.24 reads
``.bin`` files with ``torch.load(..., weights_only=True)`` (its ``weights_only`` argument defaults to True and it
requires torch >= 2.6), so :func:`load_antiberty_for_classification` goes through ``from_pretrained``; never call
a plain ``torch.load`` on these files. Loading it for classification initialises only ``classifier.weight`` and
``classifier.bias`` (the pooler is pretrained); the checkpoint's pre-training heads (``cls.predictions``,
``cls.species``, ``cls.chain``, ``cls.graft``) are ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

__all__ = [
    "AMINO_ACIDS",
    "MODEL_FAMILIES",
    "ESM2_CHECKPOINTS",
    "ADAPTER_TARGETS",
    "MODULES_TO_SAVE",
    "AntibertyPaths",
    "esm2_checkpoint",
    "antiberty_paths",
    "load_antiberty_tokenizer",
    "load_antiberty_for_classification",
    "assert_tokenizer_covers_residues",
    "format_protein",
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MODEL_FAMILIES = ("esm", "antiberty")

# ESM-2 sizes (parameters) -> hub checkpoints (t<N> = number of transformer layers).
ESM2_CHECKPOINTS: dict[str, str] = {
    "8M": "facebook/esm2_t6_8M_UR50D",
    "35M": "facebook/esm2_t12_35M_UR50D",
    "150M": "facebook/esm2_t30_150M_UR50D",
    "650M": "facebook/esm2_t33_650M_UR50D",
    "3B": "facebook/esm2_t36_3B_UR50D",
}

# Recommended adapter targets (name suffixes of nn.Linear modules): the attention query and value projections,
# as in the LoRA/DoRA/BiDoRA papers. Checked against EsmForSequenceClassification / BertForSequenceClassification.
ADAPTER_TARGETS: dict[str, tuple[str, ...]] = {"esm": ("query", "value"), "antiberty": ("query", "value")}
# The new task head, trained in full alongside the adapters.
MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {"esm": ("classifier",), "antiberty": ("classifier",)}


@dataclass(frozen=True)
class AntibertyPaths:
    """Files of the AntiBERTy checkpoint inside the installed ``antiberty`` package."""

    trained_models: Path  # tokenizer folder (vocab.txt): BertTokenizer.from_pretrained(this)
    vocab: Path
    model_dir: Path  # AntiBERTy_md_smooth: config.json + pytorch_model.bin, for from_pretrained
    weights: Path


def esm2_checkpoint(size: str) -> str:
    """Hub name of an ESM-2 checkpoint by size (``"8M"``, ``"35M"``, ``"150M"``, ``"650M"``, ``"3B"``)."""
    key = size.upper()
    if key not in ESM2_CHECKPOINTS:
        raise ValueError(f"unknown ESM-2 size {size!r}; choose one of {list(ESM2_CHECKPOINTS)}")
    return ESM2_CHECKPOINTS[key]


def antiberty_paths() -> AntibertyPaths:
    """Locate AntiBERTy's tokenizer and weights (raises with the pip command if ``antiberty==0.1.3`` is missing)."""
    root = offline_packages.antiberty_trained_models_dir()
    model_dir = root / "AntiBERTy_md_smooth"
    weights = model_dir / "pytorch_model.bin"
    for path in (model_dir / "config.json", weights):
        if not path.is_file():
            raise offline_packages.MissingOfflinePackage(
                f"{path} is missing; reinstall with: {sys.executable} -m pip install --no-deps --force-reinstall "
                f"{offline_packages.PACKAGES['antiberty']}"
            )
    return AntibertyPaths(trained_models=root, vocab=root / "vocab.txt", model_dir=model_dir, weights=weights)


def format_protein(sequence: str, model_family: str) -> str:
    """Model input text for one sequence: space-separated residues for AntiBERTy, the raw string for ESM-2.

    Whitespace already in ``sequence`` is removed and letters are upper-cased (both tokenizers are cased and only
    know upper-case residues).
    """
    if model_family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {model_family!r}; choose one of {MODEL_FAMILIES}")
    residues = "".join(sequence.split()).upper()
    if not residues:
        raise ValueError("empty protein sequence")
    return " ".join(residues) if model_family == "antiberty" else residues


def assert_tokenizer_covers_residues(tokenizer, alphabet: str = AMINO_ACIDS, model_family: str = "antiberty") -> None:
    """Raise ValueError unless every residue of ``alphabet`` gets its own, real (non-[UNK]) token.

    Checks (1) the vocabulary is larger than the alphabet (the 5-token ``BertTokenizer(vocab_file=...)`` trap),
    (2) each residue is a vocabulary entry, and (3) tokenising ``format_protein(alphabet, model_family)`` gives one
    distinct non-[UNK] id per residue (catches ``do_lower_case=True`` and a wrong input format).
    """
    vocab_size = len(tokenizer)
    if vocab_size <= len(alphabet):
        raise ValueError(
            f"tokenizer vocabulary has only {vocab_size} tokens for {len(alphabet)} residues: residues would all be "
            f"[UNK]. Under transformers 5, BertTokenizer(vocab_file=...) ignores the file; load it with "
            f"BertTokenizer.from_pretrained(<folder with vocab.txt>, do_lower_case=False)."
        )
    unk = tokenizer.unk_token_id
    vocab_ids = {aa: tokenizer.convert_tokens_to_ids(aa) for aa in alphabet}
    not_in_vocab = [aa for aa, i in vocab_ids.items() if i is None or i == unk]
    if not_in_vocab:
        raise ValueError(f"residues {not_in_vocab} are not in the tokenizer vocabulary (they map to [UNK])")
    ids = tokenizer(format_protein(alphabet, model_family), add_special_tokens=False)["input_ids"]
    expected = [vocab_ids[aa] for aa in alphabet]
    if ids != expected:
        n_unk = sum(1 for i in ids if i == unk)
        raise ValueError(
            f"tokenising the residues {alphabet!r} ({model_family} format) gave {len(ids)} ids with {n_unk} [UNK] "
            f"instead of one id per residue {expected}; is do_lower_case=True (use do_lower_case=False)?"
        )


def load_antiberty_tokenizer():
    """AntiBERTy's tokenizer: ``BertTokenizer.from_pretrained(<pkg>/trained_models, do_lower_case=False)``, checked.

    Feed it ``format_protein(seq, "antiberty")`` (space-separated residues).
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(antiberty_paths().trained_models), do_lower_case=False)
    assert_tokenizer_covers_residues(tokenizer, AMINO_ACIDS, "antiberty")
    return tokenizer


def load_antiberty_for_classification(num_labels: int = 2, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(<AntiBERTy_md_smooth>, num_labels=...)`` (offline).

    transformers reads the ``.bin`` pickle with ``torch.load(weights_only=True)``; only ``classifier.*`` is newly
    initialised. Extra ``kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(antiberty_paths().model_dir), num_labels=num_labels, **kwargs
    )
