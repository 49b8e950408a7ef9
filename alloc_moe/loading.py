"""Load a causal-LM checkpoint (hub id or local directory) through the native transformers classes."""

import os

import torch

from .errors import AllocMoeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocMoeError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise AllocMoeError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name: str, *, device: str | None = None, dtype: str | None = None, experts_implementation: str | None = None,
               progress: bool = True):
    """(model, tokenizer) in eval mode. Never runs remote code: DeepSeek-V2-Lite uses transformers' native
    `deepseek_v2` classes. Offline, a hub id fails with a one-line error; pass a local directory instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise AllocMoeError(f"model directory not found: {name} (give a local model directory or a hub id like org/name)")
    dev = pick_device(device)
    kwargs = {"dtype": pick_dtype(dtype, dev), "trust_remote_code": False}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AllocMoeError(f"cannot load model {name!r}: {first} (offline? pass a local model directory)") from None
    return model.to(dev).eval(), tokenizer
