"""lm-eval's HFLM around a loaded transformers model with a plan applied: the `hf` backend's `make_lm`.

The model is loaded once per (model, dtype, device) in a process (`load_cached`): `alloc-moe eval` evaluates several
plans, and perplexity, on one model object.
"""

import contextlib
import functools

from ...core.plan import Plan


@functools.lru_cache(maxsize=2)
def load_cached(model: str, dtype: str, device: str):
    """(model, tokenizer) of `loading.load_model`, loaded once per process."""
    from .loading import load_model

    return load_model(model, device=device, dtype=dtype, progress=False)


@contextlib.contextmanager
def make_lm(model: str, plan: Plan | None, *, batch_size: int = 64, dtype: str = "auto", device: str = "auto",
            seed: int = 0, stats=None, **_):
    """lm-eval's HFLM around the loaded model object, with `alloc_moe.apply(model, plan)` for the block."""
    from lm_eval.models.huggingface import HFLM

    from .apply import apply

    model_obj, tok = load_cached(model, dtype, device)
    lm = HFLM(pretrained=model_obj, tokenizer=tok, batch_size=batch_size, add_bos_token=tok.bos_token is not None)
    with apply(model_obj, plan, stats=stats):
        yield lm
