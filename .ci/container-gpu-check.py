"""Checks inside the GPU image that need no GPU (run by .ci/container-smoke TARGET=gpu with --network none, as the
image's user; the script comes on stdin, the lock's `name==version` pins in ALLOC_MOE_LOCK).

torch and vLLM import (CUDA build, no device), the alloc_moe entry point in vllm.general_plugins is what vLLM loads
(with ALLOC_MOE_PLAN unset it leaves vLLM untouched; with a plan it wraps BaseModelLoader.load_model, once), Triton can
build a C module (the compiler and Python headers its CUDA launcher needs), and the venv holds exactly the lock.
"""

import os
import re
import sys
import sysconfig
import tempfile
from importlib.metadata import distributions, entry_points, version

import torch
import vllm
from triton.runtime.build import compile_module_from_src
from vllm.model_executor.model_loader.base_loader import BaseModelLoader as B
from vllm.plugins import load_general_plugins

from alloc_moe.plan import Plan
from alloc_moe.backends.vllm.plugin import register

print("python", sys.version.split()[0], sys.executable)

print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available", torch.cuda.is_available())
assert torch.version.cuda and torch.version.cuda.startswith("13."), torch.version.cuda

print("vllm", vllm.__version__, "transformers", version("transformers"), "triton", version("triton"),
      "flashinfer", version("flashinfer-python"), "snakemake", version("snakemake"), "lm-eval", version("lm-eval"))
assert vllm.__version__ == "0.32.0", vllm.__version__

eps = list(entry_points(group="vllm.general_plugins"))
print("vllm.general_plugins:", eps)
assert [e.value for e in eps if e.name == "alloc_moe"] == ["alloc_moe.backends.vllm.plugin:register"], eps

# what vLLM does in every process it starts, with no plan: the plugin loads and changes nothing
os.environ.pop("ALLOC_MOE_PLAN", None)
load_general_plugins()
assert not getattr(B.load_model, "_alloc_moe", False), "patched without a plan"
print("load_general_plugins() with ALLOC_MOE_PLAN unset: loaded, vLLM untouched")

# with a plan: the patch point of this vLLM build exists and is wrapped once (register is idempotent)
plan_file = os.path.join(tempfile.mkdtemp(), "plan.json")
Plan(model="container-check", moe_layers=[0, 1], k_orig=8, budget=16, layer_method="uniform",
     k_per_layer=[8, 8]).save(plan_file)
os.environ["ALLOC_MOE_PLAN"] = plan_file
register()
register()
assert B.load_model._alloc_moe and not getattr(B.load_model.__wrapped__, "_alloc_moe", False)
print("register() with ALLOC_MOE_PLAN set: BaseModelLoader.load_model wrapped once")

# Triton compiles its CUDA launcher (C with Python.h) with the host compiler at the first kernel launch
src = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "alloc_moe_cc_check", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_alloc_moe_cc_check(void) { return PyModule_Create(&def); }
"""
mod = compile_module_from_src(src, "alloc_moe_cc_check")
print("triton compile_module_from_src (gcc + Python.h): ok,", os.path.basename(mod.__file__))

# the venv is the lock, no more and no less (pip comes with the venv, alloc-moe is the project)
lock = dict(pin.split("==") for pin in os.environ["ALLOC_MOE_LOCK"].split())
# the venv's site-packages only: importing setuptools (vLLM does) puts setuptools/_vendor, with its own dist-infos,
# on sys.path
site_packages = sysconfig.get_paths()["purelib"]
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in distributions(path=[site_packages])}
build_only = {"wheel"}  # in the lock and the wheelhouse as a build tool (like the cpu target's), not installed
off = {k: (v, have.get(k)) for k, v in lock.items() if have.get(k) != v and k not in build_only}
extra = sorted(set(have) - set(lock) - {"pip", "alloc-moe"})
assert not off and not extra, f"venv differs from the lock: {off}; not in the lock: {extra}"
installed = sum(k in have for k in lock)
print(f"venv equals docker/gpu-constraints.txt: {installed} of {len(lock)} pins installed (not the build tool wheel), "
      f"plus pip {have['pip']} (the venv's) and alloc-moe {have['alloc-moe']}")
print("gpu image checks: OK")
