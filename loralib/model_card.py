"""The model card (``README.md``) written with every adapter folder, as PEFT's ``save_pretrained`` writes one.

The card says what the folder holds: the method, the base model (id or path, when known), rank, alpha, targets,
and the training data and metrics when the caller passes them, plus how to load it with PEFT and with loralib.

A ``README.md`` is replaced only when loralib wrote it (its first body line is :data:`MARKER`). A README written by
someone else is kept as it is: no card is written and a ``UserWarning`` says so, unless the caller asks for
``model_card="overwrite"``. ``model_card=False`` writes no card.

This module imports only :mod:`loralib.files`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import atomic_write_text

__all__ = ["MARKER", "MODEL_CARD", "model_card_text", "write_model_card"]

MODEL_CARD = "README.md"
#: The first line after the YAML header of every card loralib writes; a README without it is the user's.
MARKER = "<!-- loralib model card: saving the adapter again rewrites this file; delete this line to keep your edits -->"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DESCRIPTIONS = {
    "lora": "LoRA: a low-rank update `s * B A` of each adapted weight",
    "dora": "DoRA: weight-decomposed LoRA, a trainable magnitude per output row times the direction `W0 + s * B A`",
    "bidora": "BiDoRA: DoRA whose magnitudes were trained at the upper level of a bi-level problem (on held-out "
    "data) and whose directions at the lower level",
}


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.6g}"


def _flat(metrics: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flat(value, name + " / ")
        else:
            rows.append((name, value))
    return rows


def _hub_id(base_model: str | None) -> str | None:
    """``base_model`` when it reads as a Hub id (``org/name``) and is no local path, else None (YAML header only)."""
    if not base_model or not _HUB_ID.fullmatch(base_model) or os.path.exists(base_model):
        return None
    return base_model


def model_card_text(
    *,
    method: str,
    config: Mapping,
    adapted_modules: Sequence[str],
    base_model: str | None,
    base_model_class: str,
    task_type: str | None,
    parameters: int,
    training_data: str | Sequence[str] | None = None,
    metrics: Mapping | None = None,
) -> str:
    """The card's text. ``config`` is ``AdapterConfig.to_dict()``; ``metrics`` may nest (``{split: {name: value}}``)."""
    hub_id = _hub_id(base_model)
    tags = ["loralib", "lora", *(["dora"] if method != "lora" else []), *(["bidora"] if method == "bidora" else [])]
    header = ["---", *([f"base_model: {json.dumps(hub_id)}"] if hub_id else []), "library_name: peft", "tags:"]
    header += [f"- {json.dumps(tag)}" for tag in ([f"base_model:adapter:{hub_id}"] if hub_id else []) + tags]
    header += ["- transformers", "---"]

    targets = config["target_modules"]
    spec = targets if isinstance(targets, str) else ", ".join(f"`{t}`" for t in targets)
    as_peft = "a LoRA adapter" if method == "lora" else "a DoRA adapter (`use_dora: true`)"
    rows = [
        ("method", f"{method} ({_DESCRIPTIONS.get(method, method)})"),
        ("base model", f"`{base_model}`" if base_model else "not recorded (the model was built from a config)"),
        ("base model class", f"`{base_model_class}`" + (f", PEFT task type `{task_type}`" if task_type else "")),
        ("rank r", _number(config["r"]) + (f", per module: `{json.dumps(config['rank_pattern'])}`"
                                          if config.get("rank_pattern") else "")),
        ("lora_alpha", _number(config["lora_alpha"]) + (f", per module: `{json.dumps(config['alpha_pattern'])}`"
                                                         if config.get("alpha_pattern") else "")),
        ("scaling", "lora_alpha / sqrt(r) (rsLoRA)" if config.get("use_rslora") else "lora_alpha / r"),
        ("targets", f"{spec} ({len(adapted_modules)} modules)"),
        ("modules trained in full", ", ".join(f"`{m}`" for m in config.get("modules_to_save") or []) or "none"),
        ("lora_dropout", _number(config.get("lora_dropout", 0.0))),
        ("parameters in adapter_model.safetensors", f"{parameters:,}"),
    ]
    if method != "lora":
        rows.append(("norm gradient", "detached (the DoRA paper's approximation)" if config.get("detach_norm")
                     else "exact"))
    body = [
        MARKER,
        "",
        f"# {method.upper() if method != 'bidora' else 'BiDoRA'} adapter"
        + (f" for {base_model}" if base_model else f" for a {base_model_class}"),
        "",
        f"An adapter saved by loralib in PEFT's LoRA format: `PeftModel.from_pretrained` loads "
        f"it as {as_peft}, with the same outputs.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "## Training data",
        "",
    ]
    if training_data is None:
        body.append("Not recorded.")
    else:
        items = [training_data] if isinstance(training_data, str) else list(training_data)
        body += [f"- {item}" for item in items]
    body += ["", "## Metrics", ""]
    flat = _flat(metrics) if metrics else []
    if flat:
        body += ["| metric | value |", "|---|---|", *[f"| {name} | {_number(value)} |" for name, value in flat]]
    else:
        body.append("Not recorded.")
    load_base = base_model or "<the base model>"
    body += [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base_model, {json.dumps('<this folder>')})  # base_model: {load_base}",
        "",
        "import loralib  # the loralib method and settings come back from the safetensors metadata",
        f"model = loralib.load_adapters(base_model, {json.dumps('<this folder>')})",
        "```",
        "",
        "## Files",
        "",
        "- `adapter_config.json`: PEFT's `LoraConfig`.",
        "- `adapter_model.safetensors`: the adapter tensors under PEFT's names; its header metadata holds what PEFT "
        "cannot: `loralib_method`, `loralib_config` (the whole loralib `AdapterConfig` as JSON), "
        "`loralib_base_model_class`, `loralib_adapted_modules` and `loralib_format_version`.",
        "",
    ]
    return "\n".join(header + body)


def write_model_card(directory: str | os.PathLike, text: str, mode: bool | str = True) -> Path | None:
    """Write ``text`` as ``directory/README.md``; returns the path, or None when no card was written.

    ``mode``: True writes the card unless a README.md not written by loralib is there (kept, with a warning);
    ``"overwrite"`` always writes it; False writes nothing.
    """
    if mode not in (True, False, "overwrite"):
        raise ValueError(f"model_card must be True, False or 'overwrite', got {mode!r}")
    if mode is False:
        return None
    path = Path(directory) / MODEL_CARD
    if mode is True and path.is_file():
        try:
            ours = MARKER.split(":")[0] in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            ours = False
        if not ours:
            warnings.warn(
                f"{path} exists and was not written by loralib: kept as it is, no model card written (pass "
                "model_card='overwrite' to replace it, or model_card=False to write none)",
                UserWarning,
                stacklevel=3,
            )
            return None
    return atomic_write_text(path, text)
