"""The vLLM engine settings a user chooses (CLI options of `alloc-moe eval` / `alloc-moe latency` and the workflow's
`vllm:` config key), checked without importing vLLM.

- `mode`: `graphs` (vLLM's CUDA graphs / torch.compile: the paper's setting), `eager` (`enforce_eager=True`), or
  `auto` (graphs on CUDA, eager on the CPU build, where compiling costs about a minute per engine on 2 cores).
- `gpu_memory_utilization`: the share of the GPU's memory the engine may take (0 < x <= 1); CUDA only (the CPU build
  sizes its KV cache from VLLM_CPU_KVCACHE_SPACE). Default 0.85 on CUDA.
- `moe_backend`: vLLM's MoE expert kernels; `auto` means `triton` on CUDA (variable experts per token need vLLM's
  modular Triton experts; monolithic backends never call the router) and vLLM's own choice on the CPU build.

`alloc_moe.backends.vllm.engine.engine_kwargs` resolves them per device and checks `moe_backend` against the
installed vLLM's list.
"""

import re

from ...errors import AllocMoeError

MODES = ("auto", "graphs", "eager")
CUDA_GPU_MEMORY_UTILIZATION = 0.85
CUDA_MOE_BACKEND = "triton"
_NAME = re.compile(r"^[a-z0-9_]+$")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise AllocMoeError(f"unknown vllm mode {mode!r}; allowed: {', '.join(MODES)}")
    return mode


def check_gpu_memory_utilization(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise AllocMoeError(f"gpu_memory_utilization must be a number in (0, 1], got {value!r}")
    return float(value)


def check_moe_backend(name, allowed: tuple[str, ...] | None = None) -> str:
    """`name` must look like a vLLM MoE backend name, and be one of `allowed` (the installed vLLM's) when given."""
    if not isinstance(name, str) or not _NAME.match(name) or (allowed and name not in allowed):
        hint = ", ".join(allowed) if allowed else "auto or a vLLM MoE backend name such as triton"
        raise AllocMoeError(f"unknown moe_backend {name!r}; allowed: {hint}")
    return name


def add_cli_options(parser) -> None:
    """--vllm-mode, --gpu-memory-utilization, --moe-backend (backend vllm only)."""
    parser.add_argument("--vllm-mode", default=None, metavar="MODE",
                        help=f"vllm backend: {', '.join(MODES)} (default auto: CUDA graphs on CUDA, eager on CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="X",
                        help=f"vllm backend on CUDA: share of GPU memory for the engine, 0 < X <= 1 "
                             f"(default {CUDA_GPU_MEMORY_UTILIZATION})")
    parser.add_argument("--moe-backend", default=None, metavar="NAME",
                        help=f"vllm backend: vLLM's MoE kernels (default auto: {CUDA_MOE_BACKEND} on CUDA, vLLM's "
                             "choice on CPU)")


def from_cli(args, backend: str) -> dict:
    """The backend arguments the vLLM options ask for ({} when none is given); one line if given for another
    backend or out of range."""
    given = {"mode": args.vllm_mode, "gpu_memory_utilization": args.gpu_memory_utilization,
             "moe_backend": args.moe_backend}
    given = {k: v for k, v in given.items() if v is not None}
    if given and backend != "vllm":
        raise AllocMoeError("--vllm-mode, --gpu-memory-utilization and --moe-backend apply to --backend vllm only, "
                            f"not {backend!r}")
    if "mode" in given:
        check_mode(given["mode"])
    if "gpu_memory_utilization" in given:
        check_gpu_memory_utilization(given["gpu_memory_utilization"])
    if "moe_backend" in given:
        check_moe_backend(given["moe_backend"])
    return given
