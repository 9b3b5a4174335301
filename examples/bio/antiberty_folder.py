"""Assemble a one-folder AntiBERTy checkpoint that ``AutoTokenizer`` and ``AutoModel*`` both load correctly.

``antiberty==0.1.3`` keeps the tokenizer (``trained_models/vocab.txt``) and the model
(``trained_models/AntiBERTy_md_smooth/{config.json,pytorch_model.bin}``) in different folders, and
``run_glue.py`` loads both from one ``--model_name_or_path``. Neither folder works on its own (checked with
transformers 5.24):

* ``AutoTokenizer.from_pretrained(<AntiBERTy_md_smooth>)`` finds no vocab.txt and *silently* returns a 5-token
  BertTokenizer: every residue becomes [UNK].
* a folder with config.json + vocab.txt but no ``tokenizer_config.json`` gets ``do_lower_case=True``: residues are
  lower-cased and all become [UNK] again.

So the folder built here holds ``config.json`` (copied), the weights (symlinked, or copied with ``--copy``),
``vocab.txt`` (copied) and a ``tokenizer_config.json`` with ``do_lower_case: false``; it is then checked with
``AutoTokenizer.from_pretrained(folder)`` + :func:`models.assert_tokenizer_covers_residues` (space-separated
residues, as ``run_glue.py --space_residues`` feeds them).

    python examples/bio/antiberty_folder.py OUT_DIR [--copy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from loralib.files import atomic_write, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import AntibertyPaths, antiberty_paths, assert_tokenizer_covers_residues  # noqa: E402

__all__ = ["TOKENIZER_CONFIG", "assemble_antiberty_folder", "check_antiberty_folder", "main"]

# Why each key: do_lower_case=False keeps residues upper-case (the vocabulary is upper-case only); the class is
# named so AutoTokenizer does not have to guess; 512 = the checkpoint's max_position_embeddings.
TOKENIZER_CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 512}


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _atomic_symlink(target: Path, dst: Path) -> None:
    tmp = dst.parent / f".{dst.name}.link.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, dst)


def _atomic_json(data: dict, dst: Path) -> None:
    atomic_write_text(dst, json.dumps(data, indent=2) + "\n")


def check_antiberty_folder(folder: str | os.PathLike):
    """Load ``AutoTokenizer.from_pretrained(folder)`` and raise ValueError if any residue becomes [UNK].

    Returns the tokenizer.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert_tokenizer_covers_residues(tokenizer, model_family="antiberty")
    return tokenizer


def assemble_antiberty_folder(
    dest: str | os.PathLike, paths: AntibertyPaths | None = None, copy_weights: bool = False
) -> Path:
    """Write the combined AntiBERTy folder at ``dest`` (created; existing files of ours are replaced) and check it.

    Args:
        dest: the folder to write (give it to ``run_glue.py --model_name_or_path``).
        paths: where the checkpoint files are (default: the installed ``antiberty`` package).
        copy_weights: copy the weights (~100 MB) instead of symlinking them (e.g. if the folder must move).

    Raises:
        ValueError: the assembled tokenizer still maps residues to [UNK], or ``dest`` is a file.
        offline_packages.MissingOfflinePackage: antiberty==0.1.3 is not installed (message gives the pip command).
    """
    out = Path(dest)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, expected a folder for the AntiBERTy checkpoint")
    paths = paths or antiberty_paths()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_copy(paths.model_dir / "config.json", out / "config.json")
    _atomic_copy(paths.vocab, out / "vocab.txt")
    weights = out / paths.weights.name
    if copy_weights:
        if weights.is_symlink():
            weights.unlink()
        _atomic_copy(paths.weights, weights)
    else:
        _atomic_symlink(paths.weights.resolve(), weights)
    _atomic_json(TOKENIZER_CONFIG, out / "tokenizer_config.json")
    check_antiberty_folder(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI: ``antiberty_folder.py OUT_DIR [--copy]``; prints the folder."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("out", help="folder to write (config.json, weights, vocab.txt, tokenizer_config.json)")
    parser.add_argument("--copy", action="store_true", help="copy the weights instead of symlinking them")
    args = parser.parse_args(argv)
    try:
        folder = assemble_antiberty_folder(args.out, copy_weights=args.copy)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(folder)
    return folder


if __name__ == "__main__":
    main()
