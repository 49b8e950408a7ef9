"""Prepared device check for one lent GPU (issue 14 item 7): one call, at most 6 minutes, results under one folder.

Sections (each independent: a failing one is recorded with a one-line reason and the others still run; a global
deadline stops gracefully, and a watchdog writes what there is and exits if a section overruns it):

- `hf-deepseek`: the HF backend (`alloc_moe.apply`) on the DeepSeek-V2-Lite topology at full width (hidden 2048,
  64 routed experts, K_orig 6, 2 shared experts, moe_intermediate 1408), `--layers` decoder layers (default 4:
  layer 0 dense, 3 MoE layers), random weights, bf16 on CUDA, the model's default experts implementation
  (`grouped_mm`; recorded, with the kernel functions that the expert weights reached).
  (a) bit-identity: plans with K_orig in every layer (top-k and alloc-t) give logits bit-identical to the unpatched
  model (prefill and one decode step), and the unpatched model is deterministic run to run;
  (b) counted pairs: half-budget plans (top-k K_orig/2, alloc-t K_orig/2, alloc-t fractional) compute exactly
  T*K_l (top-k) / floor(T*k_l) (alloc-t) rows per layer, counted where they reach the expert GEMMs
  (`ExpertRowCounter`) and by `RoutingStats`, on a prefill and on a decode step;
  (c) latency: `alloc_moe.backends.hf.latency.measure_hf` (CUDA events) with batch 8, prompt 32, decode 32, warm-up 2, runs 5,
  interleaved: original, Uniform top-k and Uniform + Alloc-T (k_base 1) at half budget; speedups next to
  `ideal_speedup` on the measured expert share.
- `alloc-t-graphs`: `alloc_t` [T, E] and `alloc_t_slots` [T, K] (with a padding mask) under
  `torch.compile(fullgraph=True, dynamic=False)` (inductor on CUDA): equal to eager for T in 8, 64, 256, 1024 on fresh
  inputs, also replayed from a captured CUDA graph and under `mode="reduce-overhead"` (cudagraph trees, T = 64), no
  host sync (`torch.cuda.set_sync_debug_mode("error")` around the compiled call and the graph replay), and the cost
  per call against `torch.topk(probs, K)` (CUDA-graph replays, median); and the whole per-layer Alloc-T routing
  hook `core.routing.drop_pairs` (softmax, candidate scores, selection, renormalisation, sentinels; half budget,
  padding masked), eager and compiled (equal, no host sync on CUDA), against a top-k router, with its cost per
  decode step of 26 MoE layers (issue 19 item 5).
- `triton-moe-kernel` (`section_triton_moe_kernel`): vLLM's `fused_moe_kernel` with dropped pairs vs a
  dense reference (aligned and small-batch paths, fp32/fp16/bf16, full DeepSeek width), eagerly and replayed from a
  captured CUDA graph. Adding a section = one function + one `SECTIONS` entry.

fp32 work runs with TF32 off (`torch.backends.cuda.matmul.allow_tf32 = False`, `torch.backends.cudnn.allow_tf32 =
False`, `TRITON_F32_DEFAULT=ieee` set before torch/Triton are imported); seeds are fixed.

Outputs (`--out DIR`, default `results/gpu/<UTC date>-<label>`): `results.json` (environment, each section's status,
one-line reason, checks and numbers; rewritten after every section) and `summary.md`. Exit status 0 when no section
failed or errored, 1 otherwise, 3 when the watchdog fired.

CPU (CI, this machine): `--smoke` runs every section at tiny sizes in seconds (tiny-width topology, T = 8/16,
`backend="eager"` compile; sync checks and graph capture are skipped with a recorded reason):

    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check-smoke

Without `--smoke` on CPU, hf-deepseek builds the real full-width model (about 4.5 GB in bf16 with 4 layers); shrink
the protocol there: `--sections hf-deepseek --batch 2 --prompt 8 --decode 2 --warmup 0 --runs 1`.

On the GPU machine (device tool): the image has transformers 5.17.0 (this project needs >= 5.18) and no jsonschema,
so stage wheels first, here, with `benchmarks/gpu_check_stage.sh` (downloads them into the git-ignored `.whl/`,
checks the size limit and prints the exact `run` call: carry [".whl"], a `pip install --no-deps --target /tmp/site`
of the wheels, PYTHONPATH=/tmp/site:$PWD, then this script with `--out $OUT/gpu-check`). Copy what comes back into
`results/gpu/<label>/` and commit it.
"""

import os

# before torch (and so before Triton) is imported: Triton's fp32 dot would otherwise use TF32
os.environ["TRITON_F32_DEFAULT"] = "ieee"

import argparse
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

TOPOLOGY = "deepseek-v2-lite"
SCHEMA = "alloc-moe-gpu-check/1"


# ------------------------------------------------------------------------------------------------ context


class DeadlineReached(Exception):
    """Raised inside a section when the global deadline leaves too little time for its next step."""


class Ctx:
    """What a section gets: parsed args, the device, the deadline, and `out`, the result dict it fills (kept, with
    whatever it holds, when the section raises)."""

    def __init__(self, args, device: torch.device, t0: float):
        self.args, self.device, self.t0 = args, device, t0
        self.smoke = bool(args.smoke)
        self.cuda = device.type == "cuda"
        self.deadline = t0 + float(args.deadline_s)
        self.out: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        """Stop the section (status "deadline") if fewer than `seconds` are left for `what`."""
        if self.left() < seconds:
            raise DeadlineReached(f"{self.left():.0f} s left before the deadline, {what} needs ~{seconds:.0f} s")

    def check(self, name: str, ok: bool, **details) -> bool:
        self.out.setdefault("checks", {})[name] = {"ok": bool(ok), **details}
        return bool(ok)

    def number(self, name: str, value) -> None:
        self.out.setdefault("numbers", {})[name] = value

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def one_line(e: BaseException) -> str:
    """`Type: first line of the message (at file:line)`, the innermost frame of this repo if any."""
    msg = str(e).strip().splitlines()
    where = ""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if str(REPO) in fr.filename:
            where = f" (at {Path(fr.filename).name}:{fr.lineno})"
            break
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300] + where


# ------------------------------------------------------------------------------------------------ environment


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> tuple[str | None, str]:
    from alloc_moe.harness.provenance import git_commit

    c = git_commit(REPO)
    if c:
        return c, "git"
    if os.environ.get("ALLOC_MOE_GIT_COMMIT"):
        return os.environ["ALLOC_MOE_GIT_COMMIT"], "env ALLOC_MOE_GIT_COMMIT (staged by gpu_check_stage.sh)"
    return None, "unknown"


def source_hash() -> str:
    """sha256 over alloc_moe/**/*.py, its JSON data and this script: identifies the code that ran without git."""
    h = hashlib.sha256()
    files = sorted([*(REPO / "alloc_moe").rglob("*.py"), *(REPO / "alloc_moe").rglob("*.json"), Path(__file__).resolve()])
    for f in files:
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def environment(device: torch.device) -> dict:
    import transformers

    commit, commit_source = _git_commit()
    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "transformers": transformers.__version__,
        "transformers_path": str(Path(transformers.__file__).parent),
        "jsonschema": _version("jsonschema"),
        "numpy": _version("numpy"),
        "git_commit": commit,
        "git_commit_source": commit_source,
        "source_sha256": source_hash(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "tf32": _tf32_state(),
    }
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_sms=p.multi_processor_count,
                       gpu_memory_gib=round(p.total_memory / 2**30, 1))
        except Exception as e:  # noqa: BLE001 - recorded; the sections will say what works
            env["gpu"] = f"unreadable: {one_line(e)}"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.sm,clocks.mem,power.draw",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=15, check=False)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = one_line(e)
    else:
        from alloc_moe.backends.hf.latency import _cpu_name

        env["gpu"] = None
        env["cpu"] = _cpu_name()
    return env


def tf32_off() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the legacy flags still work
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def _tf32_state() -> dict:
    """The TF32 switches as read back (each read guarded: a torch that rejects one must not stop the check)."""
    reads = {"cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
             "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
             "float32_matmul_precision": torch.get_float32_matmul_precision,
             "cuda.matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, f in reads.items():
            try:
                out[k] = f()
            except Exception as e:  # noqa: BLE001
                out[k] = f"unreadable: {one_line(e)}"
    out["TRITON_F32_DEFAULT"] = os.environ.get("TRITON_F32_DEFAULT")
    return out


# ------------------------------------------------------------------------------------------------ 1. hf-deepseek


def _plan(layers, ks, mode, k_base=1):
    from alloc_moe import Plan

    return Plan(model=f"{TOPOLOGY}-gpu-check", moe_layers=[m.index for m in layers], k_orig=layers[0].k_orig,
                budget=float(sum(ks)), layer_method="uniform", k_per_layer=list(ks), token_allocation=mode,
                k_base=k_base)


def _expected_rows(T: int, plan) -> dict[int, int]:
    if plan.token_allocation == "topk":
        return {layer: T * int(k) for layer, k in zip(plan.moe_layers, plan.k_per_layer)}
    return {layer: math.floor(T * k + 1e-9) for layer, k in zip(plan.moe_layers, plan.k_per_layer)}


class _KernelNames(torch.overrides.TorchFunctionMode):
    """Names of the torch functions that receive an expert weight (which experts kernel really ran); views and
    attribute reads are left out."""

    SKIP = frozenset({"__get__", "transpose", "t", "view", "reshape", "contiguous", "__getitem__", "size", "dim", "to",
            "chunk", "permute", "expand", "untyped_storage", "data_ptr", "stride", "is_contiguous"})

    def __init__(self, layers):
        super().__init__()
        self._ptrs = {m.experts.gate_up_proj.untyped_storage().data_ptr() for m in layers}
        self._ptrs |= {m.experts.down_proj.untyped_storage().data_ptr() for m in layers}
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self._ptrs:
                name = getattr(func, "__name__", str(func))
                if name not in self.SKIP:
                    self.names.add(name)
                break
        return func(*args, **kwargs)


def section_hf_deepseek(ctx: Ctx) -> dict:
    from alloc_moe import apply
    from alloc_moe.backends.hf.apply import ExpertRowCounter, moe_layers
    from alloc_moe.data import zoo
    from alloc_moe.backends.hf.latency import measure_hf
    from alloc_moe.stages.latency import Protocol, summarize

    a, dev, out = ctx.args, ctx.device, ctx.out
    width = "tiny" if ctx.smoke else "full"
    if a.dtype != "auto":
        dtype = getattr(torch, a.dtype)
    else:
        dtype = torch.float32 if ctx.smoke else torch.bfloat16
    out["config"] = {"topology": TOPOLOGY, "width": width, "layers": a.layers, "dtype": str(dtype).removeprefix("torch."),
                     "router_std": a.router_std, "experts_implementation_asked": a.experts_impl}

    ctx.need(30, "building the model")
    t = time.monotonic()
    with torch.device(dev):  # initialise the weights where they live (fast on a GPU)
        model = zoo.make_model(topology=TOPOLOGY, width=width, layers=a.layers, seed=0, router_std=a.router_std,
                               dtype=dtype, experts_implementation=a.experts_impl)
    model.to(dev)  # a no-op unless from_config ignored the device context
    ctx.sync()
    layers = moe_layers(model)
    K, L = layers[0].k_orig, len(layers)
    cfg = model.config
    out["config"].update(
        build_s=round(time.monotonic() - t, 2), params=sum(p.numel() for p in model.parameters()),
        hidden_size=cfg.hidden_size, n_routed_experts=layers[0].num_experts, k_orig=K,
        n_shared_experts=cfg.n_shared_experts, moe_intermediate_size=cfg.moe_intermediate_size,
        vocab_size=cfg.vocab_size, moe_layers=[m.index for m in layers],
        experts_implementation=getattr(cfg, "_experts_implementation", None),
        attn_implementation=getattr(cfg, "_attn_implementation", None),
        param_device=str(next(model.parameters()).device))
    if ctx.cuda:
        out["config"]["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 2)

    gen = torch.Generator().manual_seed(1234)
    B, P = a.batch, a.prompt
    vocab = int(cfg.vocab_size)
    ids = torch.randint(0, vocab, (B, P), generator=gen).to(dev)  # [B, P]
    nxt = torch.randint(0, vocab, (B, 1), generator=gen).to(dev)  # [B, 1]
    T = B * P

    def prefill_decode():
        """(prefill logits [B, P, V], decode-step logits [B, 1, V])"""
        with torch.inference_mode():
            o = model(input_ids=ids, use_cache=True)
            d = model(input_ids=nxt, past_key_values=o.past_key_values, use_cache=True)
        return o.logits, d.logits

    # (a) bit-identity at K_orig
    ctx.need(20, "bit-identity")
    ref_p, ref_d = prefill_decode()
    with _KernelNames(layers) as kn:
        again_p, again_d = prefill_decode()
    out["config"]["expert_kernels"] = sorted(kn.names)
    if out["config"]["experts_implementation"] == "grouped_mm":  # not transformers' per-expert fallback loop
        ctx.check("grouped_mm_kernel_used", bool(kn.names & {"grouped_mm", "_grouped_mm"}), kernels=sorted(kn.names))
    ctx.check("unpatched_deterministic", torch.equal(again_p, ref_p) and torch.equal(again_d, ref_d),
              max_abs_diff=float((again_p.float() - ref_p.float()).abs().max()))
    ctx.check("logits_finite", bool(ref_p.isfinite().all() and ref_d.isfinite().all()))
    for name, plan in (("topk", _plan(layers, [K] * L, "topk")), ("alloc-t", _plan(layers, [float(K)] * L, "alloc-t"))):
        with apply(model, plan):
            p, d = prefill_decode()
        ctx.check(f"identity_{name}_k_orig", torch.equal(p, ref_p) and torch.equal(d, ref_d),
                  prefill_max_abs_diff=float((p.float() - ref_p.float()).abs().max()),
                  decode_max_abs_diff=float((d.float() - ref_d.float()).abs().max()))
    p, d = prefill_decode()
    ctx.check("identity_after_remove", torch.equal(p, ref_p) and torch.equal(d, ref_d))
    del ref_p, ref_d, again_p, again_d, p, d

    # (b) counted pairs at half budget: rows reaching the expert GEMMs == the plan's budget
    ctx.need(20, "counted pairs")
    half = K / 2
    frac = [half + (-0.5, 0.25, 0.25)[i % 3] for i in range(L)]  # fractional alloc-t, sum <= L*K/2
    count_plans = {"uniform-topk-half": _plan(layers, [K // 2] * L, "topk"),
                   "uniform-alloc-t-half": _plan(layers, [half] * L, "alloc-t"),
                   "alloc-t-fractional": _plan(layers, frac, "alloc-t")}
    with ExpertRowCounter(model) as c:
        prefill_decode()
    ctx.check("rows_unpatched", c.rows == {m.index: (T + B) * K for m in layers}, rows=c.rows)
    counts = {}
    for name, plan in count_plans.items():
        got = {}
        with apply(model, plan, stats=True) as h, torch.inference_mode():
            with ExpertRowCounter(model) as c1:
                o = model(input_ids=ids, use_cache=True)
            prefill_stats = h.stats.computed_pairs()
            h.stats.reset()
            with ExpertRowCounter(model) as c2:
                model(input_ids=nxt, past_key_values=o.past_key_values, use_cache=True)
            decode_stats = h.stats.computed_pairs()
        got = {"k_per_layer": plan.k_per_layer,
               "prefill": {"T": T, "expected": _expected_rows(T, plan), "gemm_rows": c1.rows, "stats": prefill_stats},
               "decode": {"T": B, "expected": _expected_rows(B, plan), "gemm_rows": c2.rows, "stats": decode_stats}}
        counts[name] = got
        for phase in ("prefill", "decode"):
            g = got[phase]
            ctx.check(f"pairs_{name}_{phase}", g["gemm_rows"] == g["expected"] == g["stats"],
                      expected=g["expected"], gemm_rows=g["gemm_rows"], stats=g["stats"])
    ctx.number("counted_pairs", counts)

    # (c) latency at half budget, interleaved, CUDA events (alloc_moe.stages.latency)
    protocol = Protocol(batch=a.batch, prompt=a.prompt, decode=a.decode, warmup=a.warmup, runs=a.runs, seed=0)
    plans = [("original", None), ("uniform-topk-half", count_plans["uniform-topk-half"]),
             ("uniform-alloc-t-half", count_plans["uniform-alloc-t-half"])]
    ctx.need(60 if ctx.cuda else 10, "the latency protocol")
    t = time.monotonic()
    result = measure_hf(model, plans, protocol)
    _, summary = summarize(result, plans)
    lat = {"protocol": {k: getattr(protocol, k) for k in ("batch", "prompt", "decode", "warmup", "runs", "seed")},
           "timer": "cuda events" if ctx.cuda else "perf_counter", "device": result.device, "dtype": result.dtype,
           "expert_share": result.expert_share, "seconds": round(time.monotonic() - t, 1), "plans": {}}
    for e in summary["plans"]:
        lat["plans"][e["plan"]] = {"budget": e["budget"], "budget_ratio": e["budget_ratio"],
                                   **{ph: {k: round(v, 4) for k, v in d.items()} for ph, d in e["phases"].items()}}
    ctx.number("latency", lat)
    ctx.check("latency_finite", all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in result.rows))
    if ctx.cuda:
        out["config"]["gpu_max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out  # the model is freed with this frame, before the runner empties the CUDA cache


# ------------------------------------------------------------------------------------------------ 2. alloc-t-graphs

E_GRAPH, K_GRAPH, KL_FULL, KL_SLOTS, KB_GRAPH = 64, 6, 3.0, 2.5, 1


def _g_topk(p):
    return torch.topk(p, K_GRAPH, dim=-1)


def _g_full(p):
    from alloc_moe.core.token_alloc import alloc_t

    return alloc_t(p, KL_FULL, KB_GRAPH, K_GRAPH)


def _g_slots(s, m):
    from alloc_moe.core.token_alloc import alloc_t_slots

    return alloc_t_slots(s, k_layer=KL_SLOTS, k_base=KB_GRAPH, token_mask=m)


def _g_route(logits):
    """What a top-k router does per layer (softmax, top-K, weights renormalised): the baseline of `drop_pairs`."""
    w, i = logits.softmax(dim=-1).topk(K_GRAPH // 2, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), i


def _g_drop(logits, weights, ids, m):
    """The whole Alloc-T routing hook of one layer (`core.routing.drop_pairs`: softmax, candidate scores, the
    selection, renormalisation, sentinels) at half budget, padding masked: what a decode step adds per MoE layer."""
    from alloc_moe.core.routing import LayerRule, drop_pairs

    rule = LayerRule("alloc-t", (("k_layer", K_GRAPH / 2), ("k_base", KB_GRAPH)))
    return drop_pairs(logits, weights, ids, rule, sentinel=-1, renormalize=True, token_mask=m)


def _graph_inputs(T: int, gen: torch.Generator, dev) -> dict:
    logits = torch.randn(T, E_GRAPH, generator=gen) * 2.0
    probs = logits.softmax(dim=-1)  # [T, E]
    top = probs.topk(K_GRAPH, dim=-1, sorted=False)  # [T, K] in router slot order
    mask = torch.rand(T, generator=gen) > 0.15  # [T] ~15% padding
    mask[0] = True
    weights = top.values / top.values.sum(dim=-1, keepdim=True)
    return {"p": probs.to(dev), "s": top.values.to(dev), "m": mask.to(dev), "l": logits.to(dev),
            "w": weights.to(dev), "i": top.indices.to(torch.int32).to(dev)}


def _call(name, fn, x):
    if name == "drop":
        return fn(x["l"], x["w"], x["i"], x["m"])
    return fn(x["p"]) if name in ("topk", "full") else fn(x["s"], x["m"])


def _capture(fn, n_inner: int):
    """CUDA graph of `n_inner` calls of fn() (warmed up on a side stream first); returns (graph, last output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            y = fn()
    return g, y


def _replay_us(g, n_inner: int, reps: int) -> float:
    """Median device time per inner call (µs) over `reps` timed replays."""
    g.replay()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs) * 1e3 / n_inner


def _eager_us(fn, ctx: Ctx, n: int) -> float:
    """Median wall/device time per call without a graph (what an eager model pays, launches included)."""
    for _ in range(3):
        fn()
    ctx.sync()
    if ctx.cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) * 1e3 / n
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def _no_sync(fn, *args) -> tuple[bool, str, object]:
    """fn(*args) under torch.cuda.set_sync_debug_mode("error"): (True, "", result) or (False, one-line error, None)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return True, "", fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        return False, one_line(e), None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cloned(fn, *args):
    return fn(*args).clone()  # a cudagraph-trees output is overwritten by the next replay


def section_alloc_t_graphs(ctx: Ctx) -> dict:
    import torch._dynamo

    from alloc_moe.core.token_alloc import alloc_t_slots  # noqa: F401 - import errors show here, not in a compile

    a, dev, out = ctx.args, ctx.device, ctx.out
    backend = a.compile_backend if a.compile_backend != "auto" else ("inductor" if ctx.cuda else "eager")
    Ts = [8, 16] if ctx.smoke else [8, 64, 256, 1024]
    n_inner, reps, n_eager = (20, 50, 100) if ctx.cuda else (1, 1, 20)
    out["config"] = {"E": E_GRAPH, "k_orig": K_GRAPH, "alloc_t_k_layer": KL_FULL, "alloc_t_slots_k_layer": KL_SLOTS,
                     "k_base": KB_GRAPH, "T": Ts, "compile_backend": backend, "fullgraph": True, "dynamic": False,
                     "dtype": "float32", "timer": (f"CUDA graph of {n_inner} calls, median of {reps} replays "
                                                   "(cuda events)") if ctx.cuda else "perf_counter, no graph",
                     "padding_mask_for_slots": "~15% of tokens padded"}
    if not ctx.cuda:
        out["skipped"] = {"sync_debug": "no CUDA device: torch.cuda.set_sync_debug_mode needs one",
                          "cuda_graphs": "no CUDA device: graph capture/replay and reduce-overhead need one"}
    torch._dynamo.reset()
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 64))
    gen = torch.Generator().manual_seed(7)
    eager = {"topk": _g_topk, "full": _g_full, "slots": _g_slots}
    # one torch.compile object per function: each new T recompiles (dynamic=False), the timing reuses that code
    compiled = {name: torch.compile(eager[name], fullgraph=True, dynamic=False, backend=backend)
                for name in ("full", "slots")}
    compiled["drop"] = torch.compile(_g_drop, fullgraph=True, dynamic=False, backend=backend)
    route = torch.compile(_g_route, fullgraph=True, dynamic=False, backend=backend)
    timing = {}
    for T in Ts:
        ctx.need(40 if ctx.cuda else 5, f"compiling and timing T={T}")
        row = {}
        for name in ("full", "slots"):
            t = time.monotonic()
            cf = compiled[name]
            x = _graph_inputs(T, gen, dev)
            y = _call(name, cf, x)
            ctx.sync()
            row[f"{name}_compile_s"] = round(time.monotonic() - t, 2)
            # equal to eager on fresh inputs (each draw new), and the budget is what alloc-t promises
            same, budget_ok = torch.equal(y, _call(name, eager[name], x)), True
            for _ in range(3):
                x = _graph_inputs(T, gen, dev)
                y = _call(name, cf, x)
                same &= torch.equal(y, _call(name, eager[name], x))
                if name == "full":
                    budget_ok &= int(y.sum()) == math.floor(T * KL_FULL + 1e-9)
                else:
                    n = int(x["m"].sum())
                    budget_ok &= int(y.sum()) == math.floor(n * KL_SLOTS + 1e-9) and not bool(y[~x["m"]].any())
            ctx.check(f"compiled_equals_eager_{name}_T{T}", same)
            ctx.check(f"budget_{name}_T{T}", budget_ok)
            if ctx.cuda:
                x = _graph_inputs(T, gen, dev)
                ok, why, _ = _no_sync(_call, name, cf, x)
                ctx.check(f"no_host_sync_compiled_{name}_T{T}", ok, error=why)
                ok, why, _ = _no_sync(_call, name, eager[name], x)
                ctx.check(f"no_host_sync_eager_{name}_T{T}", ok, error=why)
                # captured CUDA graph of the compiled function: replay on fresh inputs copied into static buffers
                static = _graph_inputs(T, gen, dev)
                g, y = _capture(functools.partial(_call, name, cf, static), 1)
                same, errors = True, set()
                for _ in range(3):
                    x = _graph_inputs(T, gen, dev)
                    for k in static:
                        static[k].copy_(x[k])
                    ok, why, _ = _no_sync(g.replay)
                    errors |= {why} - {""}
                    same &= ok and torch.equal(y, _call(name, eager[name], x))
                ctx.check(f"graph_replay_equals_eager_{name}_T{T}", same, error="; ".join(sorted(errors)))
                del g
        # cost per call: topk routing vs alloc_t (eager and compiled), graph-replayed on CUDA
        x = _graph_inputs(T, gen, dev)
        part = functools.partial
        fns = {"topk": part(_g_topk, x["p"]), "alloc_t_eager": part(_g_full, x["p"]),
               "alloc_t_compiled": part(compiled["full"], x["p"]),
               "alloc_t_slots_eager": part(_g_slots, x["s"], x["m"]),
               "alloc_t_slots_compiled": part(compiled["slots"], x["s"], x["m"]),
               "route_topk_compiled": part(route, x["l"]),
               "drop_pairs_eager": part(_g_drop, x["l"], x["w"], x["i"], x["m"]),
               "drop_pairs_compiled": part(compiled["drop"], x["l"], x["w"], x["i"], x["m"])}
        for name, fn in fns.items():
            if ctx.cuda:
                g, _ = _capture(fn, n_inner)
                row[f"{name}_us"] = round(_replay_us(g, n_inner, reps), 2)
                row[f"{name}_no_graph_us"] = round(_eager_us(fn, ctx, n_eager), 2)
                del g
            else:
                row[f"{name}_us"] = round(_eager_us(fn, ctx, n_eager), 2)
        for name in ("alloc_t_eager", "alloc_t_compiled", "alloc_t_slots_eager", "alloc_t_slots_compiled"):
            row[f"{name}_over_topk"] = round(row[f"{name}_us"] / row["topk_us"], 2)
        # per decode step of the real model: every MoE layer runs the hook once (DeepSeek-V2-Lite: 26 layers)
        row["drop_pairs_compiled_over_route"] = round(row["drop_pairs_compiled_us"] / row["route_topk_compiled_us"], 2)
        row["drop_pairs_per_step_26_layers_us"] = round(26 * row["drop_pairs_compiled_us"], 1)
        got, want = _call("drop", compiled["drop"], x), _call("drop", _g_drop, x)
        ctx.check(f"compiled_equals_eager_drop_pairs_T{T}", all(torch.equal(a, b) for a, b in zip(got, want)))
        if ctx.cuda:
            ok, why, _ = _no_sync(_call, "drop", compiled["drop"], x)
            ctx.check(f"no_host_sync_compiled_drop_pairs_T{T}", ok, error=why)
        timing[T] = row
        ctx.number("per_T", timing)

    if ctx.cuda:  # the cudagraph-trees path: mode="reduce-overhead"
        ctx.need(40, "the reduce-overhead compile")
        from torch._dynamo.utils import counters

        skips0 = counters["inductor"]["cudagraph_skips"]
        T = 64
        cf = torch.compile(_g_full, fullgraph=True, dynamic=False, mode="reduce-overhead")
        same = True
        for i in range(5):  # warm-up, record, then replays
            x = _graph_inputs(T, gen, dev)
            if i >= 3:
                ok, why, y = _no_sync(_cloned, cf, x["p"])
                ctx.check(f"no_host_sync_reduce_overhead_replay{i}", ok, error=why)
            else:
                y = _cloned(cf, x["p"])
            same &= y is not None and torch.equal(y, _g_full(x["p"]))
        ctx.check("reduce_overhead_equals_eager_T64", same)
        skips1 = counters["inductor"]["cudagraph_skips"]
        # a skip means inductor fell back to no graphs (the reason is in the log): then the checks above prove less
        ctx.check("reduce_overhead_used_cudagraphs", skips1 == skips0, cudagraph_skips=skips1 - skips0)
    torch._dynamo.reset()
    return out


# ------------------------------------------------------------------------------------------------ 3. triton-moe-kernel


KERNEL_SOURCE = Path(".whl/vllm_fused_moe.py")  # staged by gpu_check_stage.sh from the vLLM the tests ran


def _kernel_source(ctx: Ctx) -> str | None:
    """vLLM's fused_moe.py: --kernel-source, else the staged copy, else an installed vLLM's ('installed')."""
    import importlib.util

    if ctx.args.kernel_source:
        return ctx.args.kernel_source
    if KERNEL_SOURCE.exists():
        return str(KERNEL_SOURCE)
    return "installed" if importlib.util.find_spec("vllm") is not None else None


def section_triton_moe_kernel(ctx: Ctx) -> dict:
    """vLLM's Triton `fused_moe_kernel` (cut verbatim out of vLLM 0.32's fused_moe.py, launched as vLLM launches it,
    `alloc_moe.backends.vllm.kernel_check`) with dropped pairs (id -1, weight 0) against a float64 dense reference over
    the kept pairs: the aligned and the small-batch path, fp32 (TF32 off: TRITON_F32_DEFAULT=ieee), fp16, bf16, small
    shapes and DeepSeek-V2-Lite's full width; eagerly, and captured once in a CUDA graph then replayed on two routings
    with NaN-filled workspaces. Runs in a subprocess (Triton's environment must be set before it is imported; a
    kernel crash stays contained). On CPU it runs the small cases under Triton's interpreter."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return {"status": "skipped", "reason": "Triton is not installed in this environment"}
    source = _kernel_source(ctx)
    if source is None:
        return {"status": "skipped", "reason": f"no vLLM fused_moe.py: stage it as {KERNEL_SOURCE} "
                                               "(benchmarks/gpu_check_stage.sh) or pass --kernel-source"}
    ctx.out["kernel_source"] = source
    cmd = [sys.executable, "-m", "alloc_moe.backends.vllm.kernel_check", "--standalone", source,
           "--device", "cuda" if ctx.cuda else "cpu"]
    if ctx.cuda:
        cmd.append("--graph")
    if ctx.smoke or not ctx.cuda:
        cmd += ["--cases", "aligned-fp32,small-batch-fp32"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_F32_DEFAULT": "ieee"}
    ctx.need(30, "the Triton kernel cases")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(ctx.left(), 30))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ctx.out["stderr_tail"] = proc.stderr[-1500:]
    if not rows:
        return dict(ctx.out, status="error", reason=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
    ctx.number("source_sha256", rows[0].get("source_sha256"))
    for r in rows:
        ctx.check(f"{r['case']}:{r['variant']}", r["ok"], rel_max_err=r["rel_max_err"], tol=r["tol"],
                  nan_rows=r["nan_rows"], dropped=f"{r['dropped_pairs']}/{r['pairs']}", path=r["path"],
                  replays=r.get("replays", 0), config=r.get("config"))
    if ctx.cuda:
        ctx.check("captured-in-cuda-graph", any(r["variant"] == "standalone-graph" for r in rows))
    return ctx.out


# name -> section function(ctx) -> dict; run in this order
SECTIONS = {
    "hf-deepseek": section_hf_deepseek,
    "alloc-t-graphs": section_alloc_t_graphs,
    "triton-moe-kernel": section_triton_moe_kernel,
}


# ------------------------------------------------------------------------------------------------ runner


def run_section(ctx: Ctx, name: str, fn) -> dict:
    """Run one section; never raises (except KeyboardInterrupt/SystemExit): status, reason, seconds are added."""
    ctx.out = {}
    t = time.monotonic()
    if ctx.left() < ctx.args.min_section_s:
        return {"status": "skipped", "reason": f"deadline: {max(ctx.left(), 0):.0f} s left", "seconds": 0.0}
    torch.manual_seed(0)
    try:
        res = fn(ctx)
        res = res if res is not None else ctx.out
        if "status" not in res:
            bad = [k for k, v in res.get("checks", {}).items() if not v["ok"]]
            if bad:
                first = res["checks"][bad[0]]
                detail = "; ".join(f"{k}={v}" for k, v in first.items() if k != "ok")
                res["status"] = "fail"
                res["reason"] = (f"{len(bad)} check(s) failed, first {bad[0]}" + (f": {detail}" if detail else ""))[:400]
            else:
                res["status"] = "pass"
    except DeadlineReached as e:
        res = dict(ctx.out, status="deadline", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a section's failure is a result
        res = dict(ctx.out, status="error", reason=one_line(e),
                   traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])[-3000:])
    finally:
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    res["seconds"] = round(time.monotonic() - t, 2)
    return res


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x)


def render_markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# GPU check: {doc['label']}", "",
             (f"{env['date_utc']}, {env.get('gpu') or env.get('cpu')}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
              f"Triton {env['triton']}, transformers {env['transformers']}, Python {env['python']}; "
              f"commit {env['git_commit']} ({env['git_commit_source']}); source sha256 {env['source_sha256'][:12]}; "
              f"{'smoke' if doc['smoke'] else 'full'} mode, deadline {doc['deadline_s']} s, total {doc.get('total_s')} s."),
             ""]
    if env.get("nvidia_smi"):
        lines += [f"nvidia-smi: `{env['nvidia_smi']}`", ""]
    lines += ["| section | status | seconds | reason |", "|---|---|---:|---|"]
    for name, r in doc["sections"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {r.get('reason', '')} |")
    hf = doc["sections"].get("hf-deepseek", {})
    if hf.get("config"):
        c = hf["config"]
        lines += ["", "## hf-deepseek", "",
                  (f"{c.get('width')} width, {c.get('layers')} decoder layers (MoE {c.get('moe_layers')}), hidden "
                   f"{c.get('hidden_size')}, {c.get('n_routed_experts')} experts, K_orig {c.get('k_orig')}, "
                   f"{c.get('dtype')}, experts implementation {c.get('experts_implementation')} (kernels seen: "
                   f"{c.get('expert_kernels')}), attention {c.get('attn_implementation')}, {c.get('params')} parameters, "
                   f"built in {c.get('build_s')} s."), ""]
    if hf.get("checks"):
        lines += ["| check | ok | details |", "|---|---|---|"]
        for k, v in hf["checks"].items():
            det = "; ".join(f"{a}={_fmt(b)}" for a, b in v.items() if a not in ("ok",) and a != "stats")
            lines.append(f"| {k} | {v['ok']} | {det[:200]} |")
    lat = hf.get("numbers", {}).get("latency")
    if lat:
        sh = lat.get("expert_share") or {}
        lines += ["", (f"Latency ({lat['timer']}, {lat['device']}, {lat['dtype']}, protocol {lat['protocol']}); "
                       f"expert share prefill {_fmt(sh.get('prefill'))}, decode {_fmt(sh.get('decode'))}:"), "",
                  "| plan | budget ratio | prefill ms | prefill speedup | ideal | decode ms/step | decode speedup | ideal |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, e in lat["plans"].items():
            pf, dc = e["prefill"], e["decode"]
            lines.append(f"| {label} | {_fmt(e['budget_ratio'])} | {_fmt(pf['median_ms'])} | {_fmt(pf['speedup'])} | "
                         f"{_fmt(pf.get('ideal_speedup'))} | {_fmt(dc['median_ms'])} | {_fmt(dc['speedup'])} | "
                         f"{_fmt(dc.get('ideal_speedup'))} |")
    gr = doc["sections"].get("alloc-t-graphs", {})
    if gr.get("checks"):
        bad = [k for k, v in gr["checks"].items() if not v["ok"]]
        lines += ["", "## alloc-t-graphs", "", f"{len(gr['checks'])} checks, {len(bad)} failed"
                  + (f": {', '.join(bad)}" if bad else "") + "."]
        if gr.get("skipped"):
            lines += [f"Skipped: {gr['skipped']}"]
    per_t = gr.get("numbers", {}).get("per_T")
    if per_t:
        lines += ["", f"Cost per call, µs ({gr['config']['timer']}):", "",
                  "| T | topk | alloc_t eager | alloc_t compiled | slots eager | slots compiled | compiled / topk |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for T, r in per_t.items():
            lines.append(f"| {T} | {r['topk_us']} | {r['alloc_t_eager_us']} | {r['alloc_t_compiled_us']} | "
                         f"{r['alloc_t_slots_eager_us']} | {r['alloc_t_slots_compiled_us']} | {r['alloc_t_compiled_over_topk']} |")
        lines += ["", "The whole Alloc-T routing hook per MoE layer (`drop_pairs`, half budget, padding masked) against a "
                  "top-k router (softmax, top-K/2, renormalise), µs per call, and per decode step of 26 MoE layers:", "",
                  "| T | top-k router compiled | drop_pairs eager | drop_pairs compiled | compiled / router | "
                  "per step, 26 layers |", "|---:|---:|---:|---:|---:|---:|"]
        for T, r in per_t.items():
            lines.append(f"| {T} | {r['route_topk_compiled_us']} | {r['drop_pairs_eager_us']} | "
                         f"{r['drop_pairs_compiled_us']} | {r['drop_pairs_compiled_over_route']} | "
                         f"{r['drop_pairs_per_step_26_layers_us']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, doc: dict) -> None:
    from alloc_moe.io import atomic_write_text

    atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(out_dir / "summary.md", render_markdown(doc))


def _label(args, device) -> str:
    if args.label:
        return args.label
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
        return "-".join(name.split()[:2]) or "cuda"
    return "cpu-smoke" if args.smoke else "cpu"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--out", help="output folder (default results/gpu/<UTC date>-<label>)")
    ap.add_argument("--label", help="label for the folder and the summary (default: GPU name, or cpu/cpu-smoke)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on CPU): exercises every code path")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="global deadline in seconds (default 300)")
    ap.add_argument("--grace-s", type=float, default=30.0,
                    help="after deadline + grace the watchdog writes the results and exits 3 (default 30)")
    ap.add_argument("--min-section-s", type=float, default=10.0, help="do not start a section with less left")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    g = ap.add_argument_group("hf-deepseek")
    g.add_argument("--layers", type=int, default=4, help="decoder layers (layer 0 dense; default 4)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: bfloat16, float32 with --smoke")
    g.add_argument("--router-std", type=float, default=None,
                   help="re-initialise routers N(0, std) (default: 0.05 full width, 1.0 smoke) for peaked routing")
    g.add_argument("--experts-impl", default=None, help="experts implementation (default: the model's, grouped_mm)")
    for name, full, smoke in (("batch", 8, 2), ("prompt", 32, 8), ("decode", 32, 2), ("warmup", 2, 0), ("runs", 5, 1)):
        g.add_argument(f"--{name}", type=int, default=None, help=f"latency protocol (default {full}, smoke {smoke})")
    g3 = ap.add_argument_group("triton-moe-kernel")
    g3.add_argument("--kernel-source", default=None,
                    help=f"vLLM's fused_moe.py (default: {KERNEL_SOURCE} if staged, else an installed vLLM's)")
    g2 = ap.add_argument_group("alloc-t-graphs")
    g2.add_argument("--compile-backend", default="auto", help="auto: inductor on CUDA, eager on CPU")
    args = ap.parse_args(argv)
    for name, full, smoke in (("batch", 8, 2), ("prompt", 32, 8), ("decode", 32, 2), ("warmup", 2, 0), ("runs", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.router_std is None:
        args.router_std = 1.0 if args.smoke else 0.05
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        ap.error(f"unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    args.section_list = names
    return args


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    from alloc_moe.backends.hf.loading import pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tf32_off()
    label = _label(args, device)
    out_dir = Path(args.out) if args.out else REPO / "results" / "gpu" / (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}-{label}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, device, t0)
    doc = {"schema": SCHEMA, "label": label, "argv": sys.argv[1:] if argv is None else list(argv), "smoke": ctx.smoke,
           "deadline_s": args.deadline_s, "environment": environment(device),
           "sections": {n: {"status": "pending"} for n in args.section_list}}
    lock = threading.Lock()
    state = {"current": None, "done": False}

    def watchdog():
        with lock:
            if state["done"]:
                return
            cur = state["current"]
            if cur is not None:
                doc["sections"][cur] = dict(ctx.out, status="deadline-overrun",
                                            reason=f"still running {args.deadline_s + args.grace_s:.0f} s after the start; "
                                                   "the watchdog stopped the check")
            doc["total_s"] = round(time.monotonic() - t0, 1)
            write_outputs(out_dir, doc)
            print(f"gpu_check: watchdog fired in section {cur}; wrote {out_dir}", flush=True)
            os._exit(3)

    timer = threading.Timer(max(ctx.deadline + args.grace_s - time.monotonic(), 1.0), watchdog)
    timer.daemon = True
    timer.start()

    def on_term(signum, frame):  # `timeout` sends SIGTERM: record and write like Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    write_outputs(out_dir, doc)
    try:
        for name in args.section_list:
            with lock:
                state["current"] = name
                doc["sections"][name] = {"status": "running"}
            print(f"gpu_check: {name} ({ctx.left():.0f} s left)", flush=True)
            r = run_section(ctx, name, SECTIONS[name])
            with lock:
                doc["sections"][name] = r
                state["current"] = None
                doc["total_s"] = round(time.monotonic() - t0, 1)
                write_outputs(out_dir, doc)
            print(f"gpu_check: {name}: {r['status']} in {r['seconds']} s" + (f" ({r['reason']})" if r.get("reason") else ""),
                  flush=True)
    except KeyboardInterrupt:
        with lock:
            cur = state["current"]
            if cur is not None:
                doc["sections"][cur] = dict(ctx.out, status="interrupted", reason="interrupted (SIGINT or SIGTERM)")
            doc["total_s"] = round(time.monotonic() - t0, 1)
            state["done"] = True
            write_outputs(out_dir, doc)
        print(f"gpu_check: interrupted; wrote {out_dir}", flush=True)
        return 130
    finally:
        timer.cancel()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    with lock:
        state["done"] = True
    print(render_markdown(doc))
    print(f"gpu_check: wrote {out_dir}", flush=True)
    return 1 if any(r["status"] in ("fail", "error", "deadline-overrun") for r in doc["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
