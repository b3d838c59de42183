# One Dockerfile, three flavors:   sdk-neuron | sdk-cpu | sdk-cuda  ->  deps  ->  app
#   docker build .                           the Neuron image (Trainium; FLAVOR=neuron is the default)
#   ./build.sh --flavor cpu --tag X          the same project on the PyTorch-native backend (CI, laptops)
# Versions: versions/neuron.json is the source of truth; build.sh passes it as build args and a unit test keeps the
# ARG defaults below equal to it, so a plain `docker build .` is pinned too.
# Layers are ordered by how often they change: SDK (rarely) -> locked deps (per lock change) -> project code (often),
# so a code-only change rebuilds the last few small layers. No secrets in any layer; the run-time image writes nothing
# into its own paths (pyxis/enroot: non-root uid, read-only rootfs, ENTRYPOINT not run, empty $HOME).
# Syntax is the subset both BuildKit and buildah 1.28 accept (no heredocs). build.sh builds the `deps` target once per
# (SDK, lock, wheels) and then the `app` stage alone on top of it, with the same resulting layers.

ARG FLAVOR=neuron
ARG NEURON_BASE_IMAGE=public.ecr.aws/docker/library/ubuntu:24.04
ARG CPU_BASE_IMAGE=public.ecr.aws/docker/library/debian:bookworm-slim
ARG CUDA_BASE_IMAGE=nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------------
# Neuron SDK: runtime libraries, collectives, tools (apt), EFA user space, torch-neuronx + NxD + NxDT (pip), NxDT examples
FROM ${NEURON_BASE_IMAGE} AS sdk-neuron
ARG DEBIAN_FRONTEND=noninteractive
ARG NEURON_SDK_VERSION=2.28.0
ARG NEURON_APT_REPO=https://apt.repos.neuron.amazonaws.com
ARG NEURON_PIP_INDEX=https://pip.repos.neuron.amazonaws.com
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG NEURON_RUNTIME_LIB_VERSION=2.30.51.0
ARG NEURON_COLLECTIVES_VERSION=2.30.59.0
ARG NEURON_TOOLS_VERSION=2.28.23.0
ARG EFA_INSTALLER_VERSION=1.47.0
ARG TORCH_VERSION=2.9.0
ARG TORCH_NEURONX_VERSION=2.9.0.2.12.22436
ARG NEURONX_CC_VERSION=2.23.6484.0
ARG NEURONX_DISTRIBUTED_VERSION=0.17.26814
ARG NEURONX_DISTRIBUTED_TRAINING_VERSION=1.7.0
ARG TRANSFORMERS_VERSION=4.56.2
ARG NXDT_GIT_URL=https://github.com/aws-neuron/neuronx-distributed-training.git
ARG NXDT_GIT_TAG=v1.7.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# OS packages float with the base image's security updates; the Neuron packages are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg git python3 python3-venv python3-dev \
    && install -d -m 0755 /etc/apt/keyrings \
    && curl -fsSL "${NEURON_APT_REPO}/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB" | gpg --dearmor -o /etc/apt/keyrings/neuron.gpg \
    && codename="$(. /etc/os-release && echo "${VERSION_CODENAME}")" \
    && echo "deb [signed-by=/etc/apt/keyrings/neuron.gpg] ${NEURON_APT_REPO} ${codename} main" \
        > /etc/apt/sources.list.d/neuron.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "aws-neuronx-runtime-lib=${NEURON_RUNTIME_LIB_VERSION}*" \
        "aws-neuronx-collectives=${NEURON_COLLECTIVES_VERSION}*" \
        "aws-neuronx-tools=${NEURON_TOOLS_VERSION}*" \
    && rm -rf /var/lib/apt/lists/*

# EFA user space only (libfabric, Open MPI); the kernel module belongs to the host.
# hadolint ignore=DL3003
RUN curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" -o /tmp/efa.tar.gz \
    && tar -xzf /tmp/efa.tar.gz -C /tmp \
    && apt-get update \
    && cd /tmp/aws-efa-installer \
    && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify \
    && cd / \
    && rm -rf /tmp/efa.tar.gz /tmp/aws-efa-installer /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        --extra-index-url "${NEURON_PIP_INDEX}" --extra-index-url "${TORCH_CPU_INDEX}" \
        "torch==${TORCH_VERSION}" \
        "torch-neuronx==${TORCH_NEURONX_VERSION}" \
        "neuronx-cc==${NEURONX_CC_VERSION}" \
        "neuronx-distributed==${NEURONX_DISTRIBUTED_VERSION}" \
        "neuronx-distributed-training==${NEURONX_DISTRIBUTED_TRAINING_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
    && install -d /etc/llama3-hyperpod \
    && echo "torch transformers tokenizers huggingface-hub" > /etc/llama3-hyperpod/lock-exclude

# NxDT's examples (training_orchestrator.py, conf/) are not in its wheel: take them from the pinned tag, at the path
# the plan expects (llama3_hyperpod.plan.DEFAULT_NXDT_EXAMPLES).
RUN git clone --quiet --depth 1 --branch "${NXDT_GIT_TAG}" "${NXDT_GIT_URL}" /tmp/nxdt \
    && install -d /opt/neuronx-distributed-training \
    && cp -r /tmp/nxdt/examples /opt/neuronx-distributed-training/examples \
    && rm -rf /tmp/nxdt

LABEL io.llama3-hyperpod.neuron-sdk="${NEURON_SDK_VERSION}" \
      io.llama3-hyperpod.torch="${TORCH_VERSION}" \
      io.llama3-hyperpod.torch-neuronx="${TORCH_NEURONX_VERSION}" \
      io.llama3-hyperpod.neuronx-cc="${NEURONX_CC_VERSION}" \
      io.llama3-hyperpod.neuronx-distributed="${NEURONX_DISTRIBUTED_VERSION}" \
      io.llama3-hyperpod.neuronx-distributed-training="${NEURONX_DISTRIBUTED_TRAINING_VERSION}" \
      io.llama3-hyperpod.aws-neuronx-runtime-lib="${NEURON_RUNTIME_LIB_VERSION}" \
      io.llama3-hyperpod.aws-neuronx-collectives="${NEURON_COLLECTIVES_VERSION}" \
      io.llama3-hyperpod.aws-neuronx-tools="${NEURON_TOOLS_VERSION}" \
      io.llama3-hyperpod.efa-installer="${EFA_INSTALLER_VERSION}" \
      io.llama3-hyperpod.nxdt-examples="${NXDT_GIT_TAG}" \
      io.llama3-hyperpod.flavor="neuron" \
      org.opencontainers.image.title="llama3-hyperpod"
ENV PATH=/opt/venv/bin:/opt/aws/neuron/bin:/opt/amazon/efa/bin:/opt/amazon/openmpi/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/aws/neuron/lib:/opt/amazon/efa/lib:/opt/amazon/efa/lib64:/opt/amazon/openmpi/lib64 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------------------------------
# CPU: Debian's Python in a venv; torch (the CPU build) comes from the lock in the deps stage. g++ and Python's
# headers: Inductor (torch_backend.compile) compiles its CPU kernels with them; a baked cache (build.sh --cache) hits.
FROM ${CPU_BASE_IMAGE} AS sdk-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
        g++ python3-dev \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -m venv /opt/venv \
    && install -d /etc/llama3-hyperpod \
    && touch /etc/llama3-hyperpod/lock-exclude
LABEL io.llama3-hyperpod.flavor="cpu" org.opencontainers.image.title="llama3-hyperpod"
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------------------------------
# CUDA (optional): torch for CUDA from PyTorch's index replaces the lock's CPU torch; g++ and Python's headers for
# Triton's launchers and Inductor.
FROM ${CUDA_BASE_IMAGE} AS sdk-cuda
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CUDA_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv g++ python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_CUDA_VERSION}" \
    && install -d /etc/llama3-hyperpod \
    && echo "torch" > /etc/llama3-hyperpod/lock-exclude
LABEL io.llama3-hyperpod.flavor="cuda" org.opencontainers.image.title="llama3-hyperpod"
ENV PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------------------------------
# The project's locked dependencies (hash-checked). WHEELHOUSE: a directory inside the build context holding the lock's
# wheels -> offline install (--no-index); the default (versions/, which holds no wheels) installs from the index
# (PyPI + PyTorch's CPU index, where the lock's torch==X+cpu lives).
# The wheelhouse is bind-mounted, never a layer. (Docker Engine's classic builder, which the Docker API drives, has no
# RUN --mount: build.sh rewrites this step to COPY + RUN for it; BuildKit and buildah/podman use it as written.)
# hadolint ignore=DL3006
FROM sdk-${FLAVOR} AS deps
ARG WHEELHOUSE=versions
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.lock llama3_hyperpod/image/lockfilter.py /opt/deps/
RUN --mount=type=bind,source=${WHEELHOUSE},target=/tmp/wheelhouse \
    python /opt/deps/lockfilter.py --exclude-file /etc/llama3-hyperpod/lock-exclude /opt/deps/requirements.lock \
        > /opt/deps/requirements.image.txt \
    && set -- --extra-index-url "${TORCH_CPU_INDEX}" \
    && if [ -n "$(find /tmp/wheelhouse/ -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) -print -quit)" ]; then \
        set -- --no-index --find-links /tmp/wheelhouse; fi \
    && pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps "$@" \
        -r /opt/deps/requirements.image.txt \
    && echo /opt/app > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama3_hyperpod_app.pth" \
    && printf '#!/bin/sh\nexec /opt/venv/bin/python /opt/app/entrypoint.py "$@"\n' > /usr/local/bin/llama3-hyperpod \
    && chmod 0755 /usr/local/bin/llama3-hyperpod

# ---------------------------------------------------------------------------------------------------------------------
# The project itself, last: a code-only change rebuilds only these layers. Byte code is compiled here (hash-checked,
# so mtimes do not matter) because nothing may be written into the image at run time. Labels that change with every
# commit (revision, cache manifest and lock hashes) are added by build.sh through the API, after the last step.
FROM deps AS app
WORKDIR /opt/app
ENTRYPOINT ["python", "/opt/app/entrypoint.py"]
CMD ["--help"]
COPY neuron_cache/ /opt/app/neuron_cache/
COPY configs/ /opt/app/configs/
COPY enroot/ /opt/app/enroot/
COPY llama3_hyperpod/ /opt/app/llama3_hyperpod/
COPY entrypoint.py /opt/app/entrypoint.py
RUN python -m compileall -q --invalidation-mode unchecked-hash /opt/app/entrypoint.py /opt/app/llama3_hyperpod
# enroot starts the container through a login shell (ENROOT_LOGIN_SHELL defaults to yes): keep this PATH in it.
# hadolint ignore=DL3059
RUN printf 'export PATH="%s"\n' "$PATH" > /etc/profile.d/llama3-hyperpod-path.sh
