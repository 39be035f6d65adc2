# The moerge image that the Helm chart (helm/moerge) runs in every Ray pod and the migration Job.
#
#   docker build -t moerge:0.1.0 .                                   CPU torch, the hf engine
#   docker build --build-arg EXTRAS=vllm -t moerge:0.1.0-vllm .      + vLLM (CUDA torch), GPU workers
#
# Ray on Kubernetes wants bash and wget in the image (KubeRay's health probes), a user with uid
# 1000, and the same Python and Ray versions in every pod of a cluster.
FROM python:3.11-slim

# Optional extras of the moerge package, comma-separated (e.g. "vllm").
ARG EXTRAS=""
# Where the CPU build of torch comes from when no extra needs the CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOERGE_HOME=/var/lib/moerge

# vLLM's Triton kernels compile a small C helper at run time: they need a C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash wget ca-certificates \
 && case ",${EXTRAS}," in *,vllm,*) apt-get install -y --no-install-recommends gcc libc6-dev ;; esac \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --shell /bin/bash ray \
 && mkdir -p "${MOERGE_HOME}" && chown ray:ray "${MOERGE_HOME}"

WORKDIR /opt/moerge
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY routers ./routers
COPY composer ./composer
COPY services ./services

# CPU torch first (the default PyPI wheel bundles CUDA, several GB); vLLM pins its own CUDA torch.
RUN case ",${EXTRAS}," in \
      *,vllm,*) ;; \
      *) pip install "torch>=2.13,<2.14" --index-url "${TORCH_INDEX_URL}" ;; \
    esac \
 && pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && moerge --help >/dev/null

USER 1000
WORKDIR /home/ray
CMD ["moerge", "--help"]
