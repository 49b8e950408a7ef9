# alloc-moe images, one Dockerfile, two targets (the entry point is `snakemake`, run in /app, the repository root):
#   cpu  the embedded default pipeline and the HF backend (torch 2.13.0 CPU build) on a Debian python base
#   gpu  the same Debian python base with the vllm extra (vllm 0.32.0, torch 2.13.0 CUDA 13.0 build), every
#        distribution pinned by docker/gpu-constraints.txt. No CUDA base image: the CUDA libraries are PyPI wheels
#        (nvidia-*, cuda-toolkit) that torch and vLLM depend on; the driver comes from the host (--gpus, the NVIDIA
#        container toolkit) and must support CUDA 13.0.
# Build: docker build --target cpu -t alloc-moe:cpu .
#        docker build --target gpu -t alloc-moe:gpu .
# Run:   docker run --rm -v "$PWD/results:/app/results" alloc-moe:cpu --cores all
#        docker run --rm --gpus all -v "$PWD/results:/app/results" alloc-moe:gpu --cores all --configfile config/paper.yaml
# Offline build: put every wheel in a directory inside the build context and pass --build-arg WHEELHOUSE=<dir>;
# when that directory holds wheels pip runs with --no-index --find-links (see .ci/container-smoke; TARGET=gpu there
# builds the gpu target from a wheelhouse). The base images are build arguments so an air-gapped machine can use a
# locally imported one (--build-arg CPU_BASE=... GPU_BASE=..., .ci/container-smoke passes its debootstrapped base).
ARG CPU_BASE=python:3.11.13-slim-bookworm
ARG GPU_BASE=python:3.11.13-slim-bookworm

# ---- the workflow files both images run (one stage, so the targets cannot drift apart) ----
# alloc_moe's sources too: the workflow hashes the code behind each job from <workflow dir>/alloc_moe
# (code() in workflow/rules/common.smk), so /app has the repository's layout; jobs run the venv's identical copy.
FROM scratch AS app
COPY Snakefile /app/
COPY config /app/config
COPY workflow /app/workflow
COPY envs /app/envs
COPY alloc_moe /app/alloc_moe

# ---- cpu: the dependencies into a venv in a build stage; the runtime stage copies that venv (2 GB) and installs the
# project over it from a wheel, so that an edit of alloc_moe/ or README.md re-runs only the small layers: the venv
# copy stays cached (CI rebuilds on every commit) ----
FROM ${CPU_BASE} AS cpu-build
ARG WHEELHOUSE=docker/wheelhouse
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/install.sh /usr/local/bin/alloc-moe-install
COPY ${WHEELHOUSE}/ /wheels/
COPY pyproject.toml /src/
# dependencies against an empty package and an empty README (pyproject's readme): only a pyproject edit re-runs them
RUN mkdir /src/alloc_moe && touch /src/alloc_moe/__init__.py /src/README.md && python3 -m venv /opt/venv \
    && alloc-moe-install /opt/venv/bin/pip /wheels "${TORCH_INDEX}" "torch==2.13.0" "/src[workflow]"

# the project as a wheel (no dependencies), built offline from the wheelhouse's setuptools
FROM cpu-build AS cpu-wheel
COPY README.md /src/
COPY alloc_moe /src/alloc_moe
# the stub build left /src/build (newer than the real sources): drop it so setuptools copies the real files
RUN rm -rf /src/build /src/*.egg-info \
    && /opt/venv/bin/pip wheel --no-deps --no-index --find-links /wheels --wheel-dir /dist /src

FROM ${CPU_BASE} AS cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg HOME=/home/alloc
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin alloc
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-wheel /dist /dist
RUN pip install --no-deps --no-index --force-reinstall --no-cache-dir --disable-pip-version-check /dist/*.whl \
    && rm -rf /dist
COPY --from=app --chown=alloc:alloc /app /app
WORKDIR /app
USER 10001
ENTRYPOINT ["snakemake"]
CMD ["--cores", "all"]

# ---- gpu: the vllm extra from the lock, installed like the cpu target's dependencies ----
FROM ${GPU_BASE} AS gpu-build
ARG WHEELHOUSE=docker/wheelhouse
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/gpu-constraints.txt
COPY docker/install.sh /usr/local/bin/alloc-moe-install
COPY ${WHEELHOUSE}/ /wheels/
COPY pyproject.toml README.md docker/gpu-constraints.txt /src/
RUN mkdir /src/alloc_moe && touch /src/alloc_moe/__init__.py && python3 -m venv /opt/venv \
    && alloc-moe-install /opt/venv/bin/pip /wheels "" "torch==2.13.0" "/src[workflow,vllm]"
COPY alloc_moe /src/alloc_moe
# the stub build left /src/build (newer than the real sources): drop it so setuptools copies the real files
RUN rm -rf /src/build /src/*.egg-info \
    && PIP_NO_DEPS=1 PIP_FORCE_REINSTALL=1 alloc-moe-install /opt/venv/bin/pip /wheels "" /src

FROM ${GPU_BASE} AS gpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg HOME=/home/alloc
# A compiler and the Python headers: at its first kernel launch Triton compiles its CUDA launcher (C, including
# Python.h) with the host compiler; g++ also for the C++ JIT paths (torch inductor, FlashInfer's nvcc when enabled).
# python3-dev only where the base's python has no headers (Debian's python3; the python:* images carry them).
# rsync: the Kubernetes profile's fs storage plugin.
# hadolint ignore=DL3008,SC2086
RUN pkgs="g++ rsync" \
    && inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths(scheme="posix_prefix")["include"])') \
    && { [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"; } \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin alloc
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=app --chown=alloc:alloc /app /app
WORKDIR /app
USER 10001
ENTRYPOINT ["snakemake"]
CMD ["--cores", "all"]
