"""One interface for every inference backend, a registry of them by name, and what `--dtype auto` means.

A backend is one object (`Backend` subclass) registered by name in `BACKENDS`; the stages reach backends only through
`get_backend(name)` (`alloc-moe eval` and `alloc-moe latency`, whose `--backend` lists the registry). Today: `hf`
(transformers, `alloc_moe.backends.hf.backend`) and `vllm` (`alloc_moe.backends.vllm.backend`).

Adding a backend (say SGLang)
-----------------------------
1. A subpackage `alloc_moe/backends/<name>/` with a `Backend` subclass whose module imports WITHOUT the engine
   installed (import the engine inside the methods); set `name`, `extra` (the pip extra that installs it) and
   `requires` (the modules it needs: `get_backend` checks them and fails with one line naming the extra).
2. One entry in `BACKENDS`: `"<name>": "alloc_moe.backends.<name>.backend:<Class>"` (imported lazily).
3. Implement (every method may raise `self.unsupported("...")`, a one-line `AllocMoeError`, for what the engine
   cannot do; vLLM, for instance, applies plans at engine load through its plugin, not on a model object):
   - `load(model, *, dtype, device, **kw)` -> the loaded model object (HF: `(model, tokenizer)`).
   - `apply(model, plan)` -> context manager: `plan` (None = the original) applied to the loaded model for the block,
     the model bit-identical to the unpatched one afterwards.
   - `make_lm(model, plan, *, batch_size, dtype, device, seed, stats=None, **engine_args)` -> context manager yielding
     an lm-eval LM with the plan applied (`stats`: a `RoutingStats` to fill, or refuse it with one line); an
     `alloc_moe_record` dict on the LM is stored with the scores as the engine's provenance.
   - `measure_latency(model_path, plans, protocol, **engine_args)` -> `stages.latency.BackendResult` (the contract,
     protocol and rows are in `alloc_moe.stages.latency`'s docstring).
   - `resolve_dtype(dtype, model)`: keep the default (`resolve_dtype` below) so `auto` means one thing everywhere.
   - optional: `routing_stats = True` when `make_lm` fills `stats` (then `eval` records computed pairs and allows
     `--perplexity`, which also needs `load`); `engine_layers(model, dtype, device)` (default: from config.json).
4. Pass the shared tests a backend must pass (the `hf` and `vllm` versions name the file):
   - the interface and the registry: `tests/backends/test_backends.py` (add the name to its parametrisations: every method
     present, constructing without the engine works, using it fails with one line naming the extra);
   - parity with HF on a zoo model under one plan (vLLM: `tests/backends/test_vllm_backend.py::test_parity_with_hf`,
     lm-eval scores `tests/backends/test_vllm_lm_eval.py::test_vllm_eval_matches_hf`);
   - pairs counted at the expert kernel equal the plan's (T*K_l top-k, floor(T*k_l) Alloc-T; HF:
     `tests/backends/test_hf_backend.py`, vLLM: `tests/backends/test_vllm_backend.py::test_pairs_at_the_kernel_follow_the_plan`);
   - K_orig plans bit-identical to the original model (HF: `tests/backends/test_hf_backend.py`, vLLM:
     `tests/backends/test_vllm_backend.py::test_k_orig_plan_is_identical_to_unpatched`);
   - the start-up errors are one line before any model loads (unknown name, missing extra, bad dtype, bad engine
     settings, a plan that does not fit: `tests/backends/test_backends.py`, `tests/stages/test_accuracy.py`, `tests/stages/test_latency.py`,
     `tests/backends/test_vllm_settings.py`);
   - latency rows in the contract's shape (`tests/stages/test_latency.py`, `tests/backends/test_vllm_latency.py`).

`--dtype auto`: see `alloc_moe.backends.dtypes` (one meaning for every backend and command).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

from ..errors import AllocMoeError
from .dtypes import (  # noqa: F401 - re-exported: the interface resolves dtypes with them
    AUTO_DTYPE,
    DTYPE_HELP,
    DTYPES,
    check_dtype,
    checkpoint_dtype,
    resolve_dtype,
)

# name -> "module:Class", imported on first use (a backend's engine is an optional dependency).
BACKENDS: dict[str, str] = {
    "hf": "alloc_moe.backends.hf.backend:HFBackend",
    "vllm": "alloc_moe.backends.vllm.backend:VLLMBackend",
}


class Backend:
    """An inference backend; see the module docstring for the contract of each method."""

    name: str = ""
    extra: str | None = None  # pip extra that installs the engine, named in the missing-dependency error
    requires: tuple[str, ...] = ()  # modules the backend needs beyond alloc_moe's own dependencies
    routing_stats: bool = False  # make_lm fills a `RoutingStats` (computed pairs); perplexity needs such a backend

    # ---- availability
    def missing(self) -> str | None:
        """The first module of `requires` that cannot be imported, or None."""
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    return mod
            except (ImportError, ValueError):
                return mod
        return None

    def require(self) -> None:
        """One line naming the extra to install when the engine is missing."""
        mod = self.missing()
        if mod is not None:
            raise AllocMoeError(f"backend {self.name!r} needs {mod}, which is not installed; install the extra: "
                                f"{self.extra}")

    def unsupported(self, what: str) -> AllocMoeError:
        return AllocMoeError(f"the {self.name} backend cannot {what}")

    # ---- the interface
    def load(self, model: str, *, dtype: str = "auto", device: str = "auto", **kw):
        raise self.unsupported("load a model object in this process")

    @contextlib.contextmanager
    def apply(self, model, plan):
        raise self.unsupported("apply a plan to a loaded model object")
        yield  # pragma: no cover

    @contextlib.contextmanager
    def make_lm(self, model: str, plan, *, batch_size: int, dtype: str, device: str, seed: int, stats=None,
                **engine_args):
        raise self.unsupported("build an lm-eval LM")
        yield  # pragma: no cover

    def measure_latency(self, model_path: str, plans, protocol, **engine_args):
        raise self.unsupported("measure latency")

    def resolve_dtype(self, dtype: str | None, model: str | None) -> str:
        return resolve_dtype(dtype, model)

    def engine_layers(self, model: str, dtype: str, device: str):
        """The MoE layers of `model` as `backends.hf.model.MoELayer`s, for K_orig and the layer count of result
        rows; by default read from config.json (no model loaded)."""
        from .hf.model import config_moe_layers

        return config_moe_layers(model)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def backend_names() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered backend `name`, ready to use: one line for an unknown name (listing the allowed ones) or a
    missing optional dependency (naming the extra to install)."""
    if name not in BACKENDS:
        raise AllocMoeError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        backend = getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise AllocMoeError(f"backend {name!r} cannot be imported ({e.name or e} is missing)") from None
    backend.require()
    return backend
