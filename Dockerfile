# syntax=docker/dockerfile:1
# The retd daemon: `retd serve` on 0.0.0.0:50051, Prometheus /metrics on :9464, the packaged
# default checkpoint (model/checkpoints/ret_v21_bpe1792) baked in.
#
#   docker build -t retd:0.1.0 .                                        # CPU (the default)
#   docker build -t retd:0.1.0-cuda --build-arg VARIANT=cuda .          # CUDA
#   docker run --rm -p 50051:50051 -p 9464:9464 retd:0.1.0
#   docker run --rm --gpus all retd:0.1.0-cuda --device cuda
#
# Arguments after the image name are added to `retd serve --host 0.0.0.0`.
# VARIANT=cpu installs torch from PyTorch's CPU wheel index (TORCH_INDEX_URL overrides it);
# VARIANT=cuda installs the torch wheel of pip's default index, which on Linux x86_64 is the
# CUDA build with its CUDA libraries as wheels: the host needs only the NVIDIA driver and
# container toolkit. Both pin torch through constraints.txt, like every install of retd.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/retd
WORKDIR /src
COPY constraints.txt ./
RUN set -eu; \
    case "$VARIANT" in \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) index="${TORCH_INDEX_URL}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    /opt/retd/bin/pip install -c constraints.txt ${index:+--index-url "$index"} torch
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
COPY model ./model
# torch is already there (the constraint pins the same version), so this adds the rest.
RUN /opt/retd/bin/pip install -c constraints.txt ".[server]" \
    && /opt/retd/bin/python -c "from retd.model.checkpoint import DEFAULT_CHECKPOINT as d; \
assert (d / 'card.json').is_file() and (d / 'model.safetensors').is_file(), \
f'no default checkpoint in {d}: train one (make train) and copy it to model/checkpoints/ret_v21_bpe1792'"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 retd \
    && useradd --system --uid 10001 --gid retd --no-create-home --shell /usr/sbin/nologin retd
COPY --from=build /opt/retd /opt/retd
ENV PATH=/opt/retd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RETD_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9464
# The gRPC health service: SERVING only once the model is loaded and warm.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["retd", "health", "--target", "127.0.0.1:50051", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["retd", "serve", "--host", "0.0.0.0"]
