"""lm-eval's HFLM around a loaded transformers model with a plan applied: the `hf` backend's `make_lm`.

The model is loaded once per (model, dtype, device) in a process (`load_cached`): `alloc-moe eval` evaluates several
plans, and perplexity, on one model object. Every plan asks the same requests, so their tokenization is kept too
(`_PAIRS`, per tokenizer): it was 2-3 s of a plan's 12-14 s on the embedded default (docs/results/performance.md).
"""

import contextlib
import functools
import weakref

from ...core.plan import Plan


@functools.lru_cache(maxsize=2)
def load_cached(model: str, dtype: str, device: str):
    """(model, tokenizer) of `loading.load_model`, loaded once per process."""
    from .loading import load_model

    return load_model(model, device=device, dtype=dtype, progress=False)


# tokenizer -> {(add_bos_token, backend, context, continuation): (context ids, continuation ids)}; weak, so a
# tokenizer load_cached has dropped takes its entries with it
_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def _hflm_class():
    """lm-eval's HFLM with `_encode_pair` kept per tokenizer across instances (lm_eval imports lazily)."""
    from lm_eval.models.huggingface import HFLM

    class PairCachingHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            cache = _PAIRS.setdefault(self.tokenizer, {})
            key = (self.add_bos_token, self.backend, context, continuation)
            if key not in cache:
                cache[key] = super()._encode_pair(context, continuation)
            ctx, cont = cache[key]
            return list(ctx), list(cont)  # copies: the caller owns what it gets, as with the uncached call

    return PairCachingHFLM


@contextlib.contextmanager
def make_lm(model: str, plan: Plan | None, *, batch_size: int = 64, dtype: str = "auto", device: str = "auto",
            seed: int = 0, stats=None, **_):
    """lm-eval's HFLM around the loaded model object, with `alloc_moe.apply(model, plan)` for the block."""
    from .apply import apply

    model_obj, tok = load_cached(model, dtype, device)
    lm = _hflm_class()(pretrained=model_obj, tokenizer=tok, batch_size=batch_size, add_bos_token=tok.bos_token is not None)
    with apply(model_obj, plan, stats=stats):
        yield lm
