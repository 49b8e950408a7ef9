#!/usr/bin/env bash
# Stage what the GPU machine lacks for benchmarks/gpu_check.py, then print the device `run` call.
#
#   PYTHON=/work/main/.venv/bin/python benchmarks/gpu_check_stage.sh [LABEL]
#
# The device image has Python 3.12, torch 2.11.0+cu130, Triton 3.6, transformers 5.17.0 and no network. This
# project needs transformers >= 5.18 (the sentinel skip) and imports jsonschema (plan validation), which the image
# lacks. So, here, download cp312 wheels of those (the versions installed in $PYTHON's environment, which the tests
# ran with) with `pip download --no-deps --only-binary=:all: --python-version 3.12` into the git-ignored `.whl/`,
# check that they and the working tree stay under the device tool's 64 MiB, record the commit (the device copy has
# no .git), and print the `run` call: carry [".whl"], pip install --no-deps into /tmp/site, PYTHONPATH, the check.
#
# Also vLLM's fused_moe.py (82 KB) from the vLLM install of the tests, for the Triton-kernel section.
#
# Wheels: transformers (its needs huggingface-hub, tokenizers, safetensors, numpy, pyyaml, tqdm, typer, packaging,
# filelock are on the image at versions it accepts; regex is carried because transformers checks regex>=2025.10.22
# at import and the image's version is unknown), jsonschema + jsonschema-specifications + referencing + rpds-py
# (attrs and typing-extensions are on the image).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
LABEL=${1:-h100}
DEST=.whl
LIMIT=$((64 * 1024 * 1024))

git check-ignore -q "$DEST/x.whl" || { echo "error: $DEST/ is not git-ignored (see .gitignore)" >&2; exit 1; }

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PKGS=()
for name in transformers regex jsonschema jsonschema-specifications referencing rpds-py; do
  PKGS+=("$name==$(ver "$name")")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PKGS[@]}"

# vLLM's fused_moe.py (the Triton MoE kernel the triton-moe-kernel section runs; the image has no vLLM), from the
# vLLM the tests ran (VLLM_PYTHON: the .venv-vllm of the README's test command)
VPY=${VLLM_PYTHON:-.venv-vllm/bin/python}
"$VPY" -c "from alloc_moe.backends.vllm.kernel_check import vllm_kernel_file as f; print(f())" > "$DEST/.src" \
  || { echo "error: no vLLM in $VPY (set VLLM_PYTHON)" >&2; exit 1; }
cp "$(cat "$DEST/.src")" "$DEST/vllm_fused_moe.py" && rm "$DEST/.src"

n=$(ls "$DEST"/*.whl | wc -l)
[ "$n" -eq "${#PKGS[@]}" ] || { echo "error: expected ${#PKGS[@]} wheels in $DEST, found $n" >&2; exit 1; }
wheels=$(du -cb "$DEST"/* | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
# the commit the device copy runs (it has no .git); "+dirty" when tracked files differ from it
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
echo "$commit" > "$DEST/COMMIT"

echo "staged in $DEST/ (${PKGS[*]}):"
ls -l "$DEST"
echo "wheels $((wheels / 1024)) KiB + working tree $((tree / 1024)) KiB = $(((wheels + tree) / 1024)) KiB (limit $((LIMIT / 1024)) KiB)"
if [ $((wheels + tree)) -ge $LIMIT ]; then
  echo "error: over the device tool's 64 MiB" >&2
  exit 1
fi

# One call: install the wheels ahead of the image's packages, run the check with a 300 s deadline (the watchdog
# exits 30 s later, `timeout` 20 s after that), results back under $OUT/gpu-check/, log and nvidia-smi beside it.
CMD="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD || exit; export ALLOC_MOE_GIT_COMMIT=$commit PYTHONUNBUFFERED=1; nvidia-smi > \$OUT/nvidia-smi.txt 2>&1; timeout -k 10 350 python3 benchmarks/gpu_check.py --deadline-s 300 --label $LABEL --out \$OUT/gpu-check 2>&1 | tee \$OUT/gpu-check.log"
echo
echo "device run call (tool 'run'; kind nvidia-h100-x1 or left out; re-stage after the last commit):"
python3 -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "carry": [".whl"], "timeout_s": 420}, indent=1))' "$CMD"
echo
echo "afterwards: copy <files_at>/gpu-check/* into results/gpu/<date>-$LABEL/ and commit results.json + summary.md"
