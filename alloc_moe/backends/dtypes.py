"""What `--dtype` means, for every backend and command (kept apart from the backend registry in `base`, so that
code which only needs a dtype does not depend on every backend: per-rule code hashes stay narrow).

`auto` means, for every backend and command: the checkpoint's own dtype as its config.json records it (`dtype`, or
the older `torch_dtype`); float32 when it records none (or when no config.json is found: a hub id not in the local hub
cache). So a bfloat16 checkpoint runs in bfloat16 on CPU too; give `--dtype float32` for full precision there.
Checkpoints written by `alloc-moe train` and the zoo record float32. `DTYPES` lists the explicit values.
"""

import json
from pathlib import Path

from ..errors import AllocMoeError

DTYPES = ("float32", "bfloat16", "float16")
AUTO_DTYPE = "float32"  # what auto means when the checkpoint records no dtype
DTYPE_HELP = ("auto (default): the checkpoint's own dtype from its config.json (dtype / torch_dtype), float32 when it "
              "records none, so a bfloat16 checkpoint runs in bfloat16 on CPU too; or " + ", ".join(DTYPES))


def _config(model: str) -> dict | None:
    """config.json of a local model directory, or of a hub id (`org/name[@revision]`) in the local hub cache."""
    path = Path(model) / "config.json"
    if not path.is_file():
        from .hf.loading import is_hub_id, split_ref

        name, revision = split_ref(model)
        if not is_hub_id(name):
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision or "main")
        except Exception:  # noqa: BLE001 - a malformed hub id: no cached config
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AllocMoeError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return config if isinstance(config, dict) else None


def checkpoint_dtype(model: str | None) -> str | None:
    """The dtype a checkpoint's config.json records (`dtype`, else `torch_dtype`), or None."""
    config = _config(model) if model is not None else None
    if not config:
        return None
    own = config.get("dtype") or config.get("torch_dtype")
    return str(own).removeprefix("torch.") if own else None


def resolve_dtype(dtype: str | None, model: str | None) -> str:
    """`dtype` as one of `DTYPES`: explicit values pass through (checked); `auto` (or None) is the checkpoint's own
    dtype as its config.json records it, float32 when it records none. One-line error otherwise."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise AllocMoeError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        return dtype
    own = checkpoint_dtype(model)
    if own is None:
        return AUTO_DTYPE
    if own not in DTYPES:
        raise AllocMoeError(f"model {model}: its config.json records dtype {own!r}, which --dtype auto cannot run; "
                            f"give --dtype {' / '.join(DTYPES)}")
    return own


def check_dtype(dtype: str) -> None:
    """One line for a `--dtype` that is neither auto nor one of `DTYPES` (before any model loads)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise AllocMoeError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
