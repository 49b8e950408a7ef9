# CPU image: the embedded default pipeline and the HF backend. The vLLM/GPU stack pins a different torch and is a
# separate image (not built yet). Build: docker build -t alloc-moe .   Run: docker run --rm -v $PWD/results:/app/results alloc-moe
FROM python:3.11-slim

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# torch first, CPU wheel, so the project's torch range is already satisfied
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY alloc_moe ./alloc_moe
RUN pip install -e ".[data,workflow]"
COPY Snakefile ./
COPY config ./config
COPY workflow ./workflow
COPY envs ./envs

ENTRYPOINT ["snakemake"]
CMD ["--cores", "2"]
