# alloc-moe images, one Dockerfile, two targets (the entry point is `snakemake`, run in /app, the repository root):
#   cpu  the embedded default pipeline and the HF backend (torch 2.13.0 CPU build) on a Debian python base
#   gpu  a CUDA base with the vLLM extra (vLLM pins its own torch)
# Build: docker build --target cpu -t alloc-moe:cpu .
#        docker build --target gpu -t alloc-moe:gpu .
# Run:   docker run --rm -v "$PWD/results:/app/results" alloc-moe:cpu --cores all
#        docker run --rm --gpus all -v "$PWD/results:/app/results" alloc-moe:gpu --cores all --configfile config/paper.yaml
# Offline build: put every wheel in a directory inside the build context and pass --build-arg WHEELHOUSE=<dir>;
# when that directory holds wheels pip runs with --no-index --find-links (see .ci/container-smoke). The base images
# are build arguments so an air-gapped machine can use a locally imported one (--build-arg CPU_BASE=...).
ARG CPU_BASE=python:3.11.13-slim-bookworm
ARG GPU_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---- the workflow files both images run (one stage, so the targets cannot drift apart) ----
# alloc_moe's sources too: the workflow hashes the code behind each job from <workflow dir>/alloc_moe
# (code() in workflow/rules/common.smk), so /app has the repository's layout; jobs run the venv's identical copy.
FROM scratch AS app
COPY Snakefile /app/
COPY config /app/config
COPY workflow /app/workflow
COPY envs /app/envs
COPY alloc_moe /app/alloc_moe

# ---- cpu: install into a venv in a build stage, copy only the venv into the runtime stage ----
FROM ${CPU_BASE} AS cpu-build
ARG WHEELHOUSE=docker/wheelhouse
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/install.sh /usr/local/bin/alloc-moe-install
COPY ${WHEELHOUSE}/ /wheels/
COPY pyproject.toml README.md /src/
# dependencies first, against an empty package, so that a source edit only re-runs the last (no-deps) install
RUN mkdir /src/alloc_moe && touch /src/alloc_moe/__init__.py && python3 -m venv /opt/venv \
    && alloc-moe-install /opt/venv/bin/pip /wheels "${TORCH_INDEX}" "torch==2.13.0" "/src[workflow]"
COPY alloc_moe /src/alloc_moe
# the stub build left /src/build (newer than the real sources): drop it so setuptools copies the real files
RUN rm -rf /src/build /src/*.egg-info \
    && PIP_NO_DEPS=1 PIP_FORCE_REINSTALL=1 alloc-moe-install /opt/venv/bin/pip /wheels "" /src

FROM ${CPU_BASE} AS cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg HOME=/home/alloc
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin alloc
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=app --chown=alloc:alloc /app /app
WORKDIR /app
USER 10001
ENTRYPOINT ["snakemake"]
CMD ["--cores", "all"]

# ---- gpu: CUDA base (driver libraries come from the host through --gpus), vLLM extra ----
FROM ${GPU_BASE} AS gpu-build
ARG WHEELHOUSE=docker/wheelhouse
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY docker/install.sh /usr/local/bin/alloc-moe-install
COPY ${WHEELHOUSE}/ /wheels/
COPY pyproject.toml README.md /src/
RUN mkdir /src/alloc_moe && touch /src/alloc_moe/__init__.py && python3 -m venv /opt/venv \
    && alloc-moe-install /opt/venv/bin/pip /wheels "" "/src[workflow,vllm]"
COPY alloc_moe /src/alloc_moe
# the stub build left /src/build (newer than the real sources): drop it so setuptools copies the real files
RUN rm -rf /src/build /src/*.egg-info \
    && PIP_NO_DEPS=1 PIP_FORCE_REINSTALL=1 alloc-moe-install /opt/venv/bin/pip /wheels "" /src

FROM ${GPU_BASE} AS gpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg HOME=/home/alloc
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 rsync \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin alloc
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=app --chown=alloc:alloc /app /app
WORKDIR /app
USER 10001
ENTRYPOINT ["snakemake"]
CMD ["--cores", "all"]
