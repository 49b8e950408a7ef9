"""Load a causal-LM checkpoint through the native transformers classes.

A model reference is a local directory, a hub id (`org/name`: its main branch) or a hub id at a revision
(`org/name@<branch, tag or commit>`); `split_ref` takes it apart, and every loader (transformers here, vLLM in
`alloc_moe.backends.vllm`) passes the revision on. `resolved_commit` says which commit a reference loaded.

torch is imported inside the functions that need it: the workflow's start (`common.smk` uses `is_hub_id` and
`split_ref`) stays light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import AllocMoeError


def pick_device(device: str | None) -> torch.device:  # noqa: F821
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocMoeError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def torch_dtype(dtype: str | None, model: str | None) -> torch.dtype:  # noqa: F821
    """The torch dtype `dtype` means for `model` (`auto`: the checkpoint's own, `alloc_moe.backends.base.resolve_dtype`)."""
    import torch

    from ..dtypes import resolve_dtype

    return getattr(torch, resolve_dtype(dtype, model))  # every name of `dtypes.DTYPES` is a torch dtype


def is_hub_id(name: str) -> bool:
    """A hub id (`org/name` or `name`), not a local path: at most one slash, no leading `.`, `/` or `~`, no such folder."""
    return not os.path.isdir(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def split_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (`org/name`, `revision`); a local path or a hub id without `@` -> (ref, None)."""
    name, at, revision = ref.rpartition("@")
    if not at or os.path.exists(ref) or not is_hub_id(name):
        return ref, None
    if not revision.strip() or revision != revision.strip():
        raise AllocMoeError(f"model {ref!r}: empty or padded revision after '@'; give org/name@<branch, tag or commit>")
    return name, revision


def hub_kwargs(ref: str) -> tuple[str, dict]:
    """(name, the revision keywords of vLLM's `LLM` / lm-eval's `VLLM`) for a model reference; {} without a revision."""
    name, revision = split_ref(ref)
    return name, ({"revision": revision, "tokenizer_revision": revision} if revision else {})


def resolved_commit(ref: str) -> str | None:
    """The commit a reference loads: a staged or cached snapshot folder (`.../snapshots/<commit>`) names it; a hub id
    (at a revision) is looked up in the local hub cache (HF_HUB_CACHE), without network. None when unknown."""
    path = Path(ref)
    if path.is_dir():
        return path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    name, revision = split_ref(ref)
    if not is_hub_id(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    return Path(cached).parent.name if isinstance(cached, str) else None


def load_model(name: str, *, device: str | None = None, dtype: str | None = None, experts_implementation: str | None = None,
               progress: bool = True):
    """(model, tokenizer) in eval mode for a model reference (local directory, hub id, hub id@revision), in `dtype`
    (`auto`: the checkpoint's own dtype as its config.json records it, float32 when it records none). Never runs
    remote code: DeepSeek-V2-Lite uses transformers' native `deepseek_v2` classes. Offline (HF_HUB_OFFLINE=1) a hub id
    loads from the hub cache (a stage's `hub/`, see `alloc_moe.data.stage`), else fails with a one-line error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    ref = name
    name, revision = split_ref(ref)
    if not os.path.isdir(name) and not is_hub_id(name):
        raise AllocMoeError(f"model directory not found: {name} (give a local model directory or a hub id like org/name)")
    dev = pick_device(device)
    kwargs = {"dtype": torch_dtype(dtype, ref), "trust_remote_code": False}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AllocMoeError(f"cannot load model {ref!r}: {first} (offline? stage it with alloc-moe stage, or pass a "
                            "local model directory)") from None
    return model.to(dev).eval(), tokenizer
