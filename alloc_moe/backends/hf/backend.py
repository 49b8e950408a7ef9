"""`HFBackend`: the transformers backend behind the `Backend` interface (`alloc_moe.backends.base`).

Loading `loading.load_model`, plans `apply.apply` (on the loaded model object, removable), lm-eval `lm.make_lm`,
latency `latency.measure`. Collects routing statistics (computed pairs) and runs in this process, so perplexity and
profiling can share its model object.
"""

from ..base import Backend


class HFBackend(Backend):
    name = "hf"
    extra = None  # transformers is a core dependency
    requires = ("transformers", "lm_eval")
    routing_stats = True  # make_lm fills a RoutingStats

    def load(self, model: str, *, dtype: str = "auto", device: str = "auto", **kw):
        """(model, tokenizer), loaded once per (model, dtype, device) in a process unless `kw` asks for more."""
        from . import lm, loading

        if kw:
            return loading.load_model(model, dtype=dtype, device=device, **{"progress": False, **kw})
        return lm.load_cached(model, dtype, device)

    def apply(self, model, plan, *, stats=None):
        """`alloc_moe.apply`: its handle is the context manager (the model restored exactly on exit)."""
        from .apply import apply

        return apply(model, plan, stats=stats)

    def make_lm(self, model: str, plan, *, batch_size: int, dtype: str, device: str, seed: int, stats=None,
                **engine_args):
        from ...errors import AllocMoeError
        from .lm import make_lm

        if engine_args:
            raise AllocMoeError(f"the hf backend takes no engine settings (got {', '.join(sorted(engine_args))})")
        return make_lm(model, plan, batch_size=batch_size, dtype=dtype, device=device, seed=seed, stats=stats)

    def measure_latency(self, model_path: str, plans, protocol, **engine_args):
        from .latency import measure

        return measure(model_path, plans, protocol, **engine_args)

    def engine_layers(self, model: str, dtype: str, device: str):
        from .model import moe_layers

        return moe_layers(self.load(model, dtype=dtype, device=device)[0])
