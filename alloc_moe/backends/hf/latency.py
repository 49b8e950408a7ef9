"""The `hf` backend's latency: the protocol of `alloc_moe.stages.latency` on a transformers model in this process.

Every label (the original and each plan) is measured once per run, in an order rotated by the run index, with the plan
applied by `alloc_moe.apply` and removed after; the share of each phase's time spent inside the routed experts comes
from one extra instrumented run (`expert_share`). CUDA events on GPU, wall time on CPU.
"""

import time
from pathlib import Path

import torch

from ...core.plan import Plan
from ...errors import AllocMoeError
from ...stages.latency import BackendResult, Protocol


class _Clock:
    """Wall time on CPU; CUDA events (device time, one synchronisation at the end) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms_since(self, t0) -> float:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return float(t0.elapsed_time(ev))
        return (time.perf_counter() - t0) * 1e3


def _inputs(model, protocol: Protocol, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random prompt [B, P] and next tokens [D, B, 1], the same for every plan and run."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(protocol.seed)
    prompt = torch.randint(0, vocab, (protocol.batch, protocol.prompt), generator=gen)  # [B, P]
    steps = torch.randint(0, vocab, (protocol.decode, protocol.batch, 1), generator=gen)  # [D, B, 1]
    return prompt.to(device), steps.to(device)


def _one_run(model, prompt, steps, clock: _Clock) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of one generation: prefill builds the cache, decode steps on it."""
    with torch.inference_mode():
        t0 = clock.start()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = clock.ms_since(t0)
        cache = out.past_key_values
        t0 = clock.start()
        for ids in steps:  # [B, 1]
            cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
        decode = clock.ms_since(t0) / steps.shape[0]
    return prefill, decode


class _ExpertTimer:
    """Hooks around every routed-experts module that sum the time spent inside them (synchronising on GPU)."""

    def __init__(self, layers, device: torch.device):
        self.ms = 0.0
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._handles = []
        for m in layers:
            self._handles.append(m.experts.register_forward_pre_hook(self._enter))
            self._handles.append(m.experts.register_forward_hook(self._exit))

    def _enter(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _exit(self, module, args, output):
        self._sync()
        self.ms += (time.perf_counter() - self._t0) * 1e3

    def remove(self):
        for h in self._handles:
            h.remove()


def expert_share(model, prompt, steps, device) -> dict[str, float]:
    """Share of each phase's time spent inside the routed experts, from one instrumented run of `model` as it is."""
    from .apply import moe_layers

    timer = _ExpertTimer(moe_layers(model), device)
    clock = _Clock(torch.device("cpu"))  # host clock: the hooks synchronise anyway
    try:
        with torch.inference_mode():
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = clock.start()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            sync()
            prefill, prefill_experts = clock.ms_since(t0), timer.ms
            cache, timer.ms = out.past_key_values, 0.0
            t0 = clock.start()
            for ids in steps:
                cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
            sync()
            decode, decode_experts = clock.ms_since(t0), timer.ms
    finally:
        timer.remove()
    return {"prefill": prefill_experts / prefill, "decode": decode_experts / decode}


def measure_hf(model, plans: list[tuple[str, Plan | None]], protocol: Protocol) -> BackendResult:
    """The protocol on a model object already loaded (used by `measure`, the benchmarks and tests)."""
    from .apply import apply

    device = next(model.parameters()).device
    prompt, steps = _inputs(model, protocol, device)
    clock = _Clock(device)
    rows = []
    for run in range(protocol.warmup + protocol.runs):
        shift = run % len(plans)
        for label, plan in plans[shift:] + plans[:shift]:  # rotate the order: no label always goes first
            handle = apply(model, plan) if plan is not None else None
            try:
                prefill, decode = _one_run(model, prompt, steps, clock)
            finally:
                if handle is not None:
                    handle.remove()
            if run >= protocol.warmup:
                rows += [{"plan": label, "phase": "prefill", "run": run - protocol.warmup, "ms": prefill},
                         {"plan": label, "phase": "decode", "run": run - protocol.warmup, "ms": decode}]
    share = expert_share(model, prompt, steps, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return BackendResult(rows, share, name, str(next(model.parameters()).dtype).removeprefix("torch."))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure(model_path: str, plans: list[tuple[str, Plan | None]], protocol: Protocol,
               **backend_args) -> BackendResult:
    """The `hf` backend: transformers model loaded from `model_path`, plans applied by `alloc_moe.apply`."""
    if backend_args:
        raise AllocMoeError(f"the hf latency backend takes no engine settings (got {', '.join(sorted(backend_args))})")
    from . import loading

    model, _ = loading.load_model(model_path, device=protocol.device, dtype=protocol.dtype,
                          experts_implementation=protocol.experts_implementation, progress=False)
    return measure_hf(model, plans, protocol)
