"""File utilities shared by loralib, the examples and ``utils/``: atomic writes and checked reads.

* :func:`atomic_write` / :func:`atomic_write_text`: write a temporary file beside the target, then rename it, so a
  crash (or a kill) never leaves half a file under the target's name. The temporary files are named
  ``.<name>.<random>.tmp``; one is left behind only by a kill during the write.
* :func:`write_split`: a data folder (``train`` / ``test`` / ... files) with its record ``split.json`` written last,
  so that the record's presence means the data next to it are complete (every example's data builder uses it).
* :func:`read_json` / :func:`read_safetensors`: read a file or raise an error that names the file and what is
  wrong with it (missing, not UTF-8, not JSON, truncated, NaN / inf in a tensor).

This module imports nothing from the rest of loralib, and torch / safetensors only inside
:func:`read_safetensors`, so that the reporting scripts can use it without loading torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "read_json", "read_safetensors", "write_split"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` for a temporary file in the folder of ``path``, then rename it to ``path``; returns
    ``path``. The folder is created if needed; on any error the temporary file is removed and ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines untouched) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))


def write_split(out_dir: str | os.PathLike, files: dict[str, str], record: dict,
                record_name: str = "split.json") -> Path:
    """Write ``files`` ({file name: text}) into ``out_dir`` atomically, then ``record`` as JSON (indent 2) last.

    A reader that finds ``record_name`` can trust every file beside it: a crash before the end leaves no record, and
    the builder runs again. Returns the record's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return atomic_write_text(out / record_name, json.dumps(record, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``.

    Raises FileNotFoundError when the file is missing and ValueError (naming the file, the line and the column)
    when it is not UTF-8 JSON or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno} col {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not valid here: it holds a JSON {type(data).__name__}, not an object")
    return data


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``, tensors on the CPU.

    Raises FileNotFoundError when the file is missing, ValueError when it is not a readable safetensors file
    (truncated, corrupted) or when a floating-point tensor holds NaN or inf (naming the tensor).
    """
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted: {err})") from None
    for key, value in tensors.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key!r} in {path} contains NaN or inf values; refusing to load it")
    return tensors, metadata
