# One Dockerfile, three flavors:   sdk-neuron | sdk-cpu | sdk-cuda  ->  deps  ->  app
#   docker build .                           the Neuron image (Trainium; FLAVOR=neuron is the default)
#   ./build.sh --flavor cpu --tag X          the same project on the PyTorch-native backend (CI, laptops)
#
# Two Python environments in every flavor; the project's layers never write into the SDK's:
#   the SDK's      ENV L3HP_SDK_PYTHON  neuron: AWS's NxDT training image for the pinned SDK, FROM it and unchanged
#                                       (/usr/local/bin/python3.12 with torch-neuronx, NxDT, apex, Megatron core, NeMo);
#                                       cpu: /opt/sdk, a venv with torch and what torch needs from our lock
#                                       (hash-checked); cuda: /opt/sdk with PyTorch's CUDA build
#   the project's  /opt/venv            our lock, hash-checked (neuron: without torch); run as
#                                       /usr/local/bin/llama3-hyperpod (the ENTRYPOINT); not on PATH, where
#                                       `python` and `torchrun` are the SDK's
# neuron: the project's venv does not see the SDK; NxDT runs in the SDK environment alone, started by absolute path:
#   $L3HP_SDK_PYTHON -m torch.distributed.run ... /opt/neuronx-distributed-training/examples/training_orchestrator.py
#   (compile: $(dirname $L3HP_SDK_PYTHON)/neuron_parallel_compile in front). The project reads what the SDK holds from
#   /etc/llama3-hyperpod/sdk.json (written by llama3_hyperpod/image/sdkcheck.py) instead of importing it.
# cpu/cuda: the lock's packages that the SDK venv holds are left out of the project's venv (/etc/llama3-hyperpod/
#   lock-exclude), and a .pth appends the SDK venv's site-packages to the project's sys.path at the lowest priority,
#   so the trainer imports the SDK's torch. The launcher is the SDK's own torchrun, the workers the project's python:
#   $L3HP_SDK_PYTHON -m torch.distributed.run ... --no-python /opt/venv/bin/python -m llama3_hyperpod.torch_backend.train
# Versions: versions/neuron.json is the source of truth; build.sh passes it as build args and a unit test keeps the
# ARG defaults below equal to it, so a plain `docker build .` is pinned too; the neuron stage's build fails unless the
# base image holds every pin of that file.
# Layers are ordered by how often they change: SDK (rarely) -> locked deps (per lock change) -> project code (often),
# so a code-only change rebuilds the last few small layers. No secrets in any layer; the run-time image writes nothing
# into its own paths (pyxis/enroot: non-root uid, read-only rootfs, ENTRYPOINT not run, empty $HOME).
# Syntax is the subset both BuildKit and buildah 1.28 accept (no heredocs). build.sh builds the `deps` target once per
# (SDK, lock, wheels) and then the `app` stage alone on top of it, with the same resulting layers.

ARG FLAVOR=neuron
ARG NEURON_BASE_IMAGE=public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04
ARG CPU_BASE_IMAGE=public.ecr.aws/docker/library/debian:bookworm-slim
ARG CUDA_BASE_IMAGE=nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------------
# Neuron: AWS's NxDT training image (aws-neuron/deep-learning-containers 2.28.0, pytorch/training/2.9.0/
# Dockerfile.neuronx): Neuron runtime, collectives and tools, EFA, torch-neuronx, neuronx-cc, NxD, NxDT, apex 25.07,
# NxDT's requirement set, Megatron core r0.10.0 and the NeMo patches, as AWS builds and tests them. Nothing is
# installed into it; the build only checks it (sdkcheck.py) and adds NxDT's examples, which neither that image nor
# the NxDT wheel holds, from the pinned commit of NxDT's public repository.
FROM ${NEURON_BASE_IMAGE} AS sdk-neuron
ARG NEURON_BASE_IMAGE
ARG NEURON_SDK_VERSION=2.28.0
ARG NXDT_GIT_URL=https://github.com/aws-neuron/neuronx-distributed-training.git
ARG NXDT_EXAMPLES_COMMIT=9169aa03f39efd4eb02da63891a7ed98defb1714
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# AWS's image probes a SageMaker server on :8080 that nothing here runs.
HEALTHCHECK NONE
RUN git init --quiet /tmp/nxdt \
    && git -C /tmp/nxdt fetch --quiet --depth 1 "${NXDT_GIT_URL}" "${NXDT_EXAMPLES_COMMIT}" \
    && git -C /tmp/nxdt checkout --quiet FETCH_HEAD \
    && test "$(git -C /tmp/nxdt rev-parse HEAD)" = "${NXDT_EXAMPLES_COMMIT}" \
    && install -d /opt/neuronx-distributed-training \
    && cp -r /tmp/nxdt/examples /opt/neuronx-distributed-training/examples \
    && rm -rf /tmp/nxdt
ENV L3HP_SDK_PYTHON=/usr/local/bin/python3.12 \
    PATH=/opt/aws/neuron/bin:/opt/amazon/efa/bin:/opt/amazon/openmpi/bin:${PATH}
COPY versions/neuron.json /etc/llama3-hyperpod/neuron.json
COPY llama3_hyperpod/image/sdkcheck.py /opt/deps/
# The project's venv here gets the lock without torch: the lock's torch is the CPU build for the cpu flavor (and
# Python 3.11); the torch backend is for the cpu/cuda flavors, and NxDT runs in the SDK environment.
RUN "${L3HP_SDK_PYTHON}" /opt/deps/sdkcheck.py --versions /etc/llama3-hyperpod/neuron.json \
        --record /etc/llama3-hyperpod/sdk.json \
    && echo torch > /etc/llama3-hyperpod/lock-exclude
LABEL io.llama3-hyperpod.neuron-sdk="${NEURON_SDK_VERSION}" \
      io.llama3-hyperpod.sdk-image="${NEURON_BASE_IMAGE}" \
      io.llama3-hyperpod.nxdt-examples="${NXDT_EXAMPLES_COMMIT}" \
      io.llama3-hyperpod.flavor="neuron" \
      org.opencontainers.image.title="llama3-hyperpod"

# ---------------------------------------------------------------------------------------------------------------------
# CPU: Debian's Python; the SDK venv /opt/sdk holds torch (the CPU build) and what it needs, from our lock with hashes.
# g++ and Python's headers: Inductor (torch_backend.compile) compiles its CPU kernels with them; a baked cache hits.
# wheelhouse/ (in the build context; build.sh --wheelhouse DIR links DIR's wheels there for one build): when it holds
# the lock's wheels the install is offline (--no-index); with only its README it installs from the index (PyPI +
# PyTorch's CPU index, where the lock's torch==X+cpu lives). It is bind-mounted, never a layer, at a fixed path
# (dockerd 20.10's BuildKit does not expand build args in --mount). Docker Engine's classic builder, which the Docker
# API drives, has no RUN --mount: build.sh rewrites such a step to COPY + RUN for it; BuildKit and buildah use it as
# written.
FROM ${CPU_BASE_IMAGE} AS sdk-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
        g++ python3-dev \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -m venv /opt/sdk
ENV L3HP_SDK_PYTHON=/opt/sdk/bin/python \
    PATH=/opt/sdk/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY requirements.lock llama3_hyperpod/image/lockfilter.py llama3_hyperpod/image/sdkcheck.py /opt/deps/
RUN --mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse \
    /usr/bin/python3 /opt/deps/lockfilter.py --closure torch /opt/deps/requirements.lock > /opt/deps/requirements.sdk.txt \
    && set -- --extra-index-url "${TORCH_CPU_INDEX}" \
    && if [ -n "$(find /tmp/wheelhouse/ -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) -print -quit)" ]; then \
        set -- --no-index --find-links /tmp/wheelhouse; fi \
    && /opt/sdk/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps "$@" \
        -r /opt/deps/requirements.sdk.txt \
    && /opt/sdk/bin/pip --disable-pip-version-check check \
    && "${L3HP_SDK_PYTHON}" /opt/deps/sdkcheck.py --record /etc/llama3-hyperpod/sdk.json \
        --share-with-project /etc/llama3-hyperpod
LABEL io.llama3-hyperpod.flavor="cpu" org.opencontainers.image.title="llama3-hyperpod"

# ---------------------------------------------------------------------------------------------------------------------
# CUDA (optional): the SDK venv /opt/sdk holds PyTorch's CUDA build from PyTorch's index; g++ and Python's headers for
# Triton's launchers and Inductor.
FROM ${CUDA_BASE_IMAGE} AS sdk-cuda
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CUDA_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV L3HP_SDK_PYTHON=/opt/sdk/bin/python \
    PATH=/opt/sdk/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY llama3_hyperpod/image/sdkcheck.py /opt/deps/
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv g++ python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/sdk \
    && /opt/sdk/bin/pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_CUDA_VERSION}" \
    && /opt/sdk/bin/pip --disable-pip-version-check check \
    && "${L3HP_SDK_PYTHON}" /opt/deps/sdkcheck.py --record /etc/llama3-hyperpod/sdk.json \
        --share-with-project /etc/llama3-hyperpod
LABEL io.llama3-hyperpod.flavor="cuda" org.opencontainers.image.title="llama3-hyperpod"

# ---------------------------------------------------------------------------------------------------------------------
# The project's own venv /opt/venv, made by the SDK's interpreter (same Python version), with our lock: hash-checked,
# without what /etc/llama3-hyperpod/lock-exclude names. setuptools from the lock goes in first and builds the lock's
# sdists (antlr4-python3-runtime, python-hostlist) without build isolation, so an offline wheelhouse needs nothing
# the lock does not pin. Both venvs must pass `pip check`. The wheelhouse mount is the one described under sdk-cpu.
# The last line keeps the image's PATH in a login shell: enroot starts containers through one by default
# (ENROOT_LOGIN_SHELL, enroot.in line 94) and Debian's /etc/profile resets PATH; /etc/profile.d/ is read after it.
# hadolint ignore=DL3006
FROM sdk-${FLAVOR} AS deps
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.lock llama3_hyperpod/image/lockfilter.py /opt/deps/
RUN --mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse \
    "${L3HP_SDK_PYTHON}" -m venv /opt/venv \
    && /opt/venv/bin/python /opt/deps/lockfilter.py --only setuptools /opt/deps/requirements.lock \
        > /opt/deps/requirements.build.txt \
    && /opt/venv/bin/python /opt/deps/lockfilter.py --exclude-file /etc/llama3-hyperpod/lock-exclude \
        /opt/deps/requirements.lock > /opt/deps/requirements.image.txt \
    && set -- --extra-index-url "${TORCH_CPU_INDEX}" \
    && if [ -n "$(find /tmp/wheelhouse/ -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) -print -quit)" ]; then \
        set -- --no-index --find-links /tmp/wheelhouse; fi \
    && set -- --no-cache-dir --disable-pip-version-check --require-hashes --no-deps --use-pep517 "$@" \
    && if [ -s /opt/deps/requirements.build.txt ]; then \
        /opt/venv/bin/pip install "$@" -r /opt/deps/requirements.build.txt; fi \
    && /opt/venv/bin/pip install "$@" --no-build-isolation -r /opt/deps/requirements.image.txt \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && echo /opt/app > "${site}/llama3_hyperpod_app.pth" \
    && if [ -f /etc/llama3-hyperpod/sdk.pth ]; then cp /etc/llama3-hyperpod/sdk.pth "${site}/zz_llama3_hyperpod_sdk.pth"; fi \
    && /opt/venv/bin/pip --disable-pip-version-check check \
    && printf '#!/bin/sh\nexec /opt/venv/bin/python /opt/app/entrypoint.py "$@"\n' > /usr/local/bin/llama3-hyperpod \
    && chmod 0755 /usr/local/bin/llama3-hyperpod \
    && printf 'export PATH="%s"\n' "$PATH" > /etc/profile.d/llama3-hyperpod-path.sh

# ---------------------------------------------------------------------------------------------------------------------
# The project itself, last: a code-only change rebuilds only these layers. Byte code is compiled here (hash-checked,
# so mtimes do not matter) because nothing may be written into the image at run time. Labels that change with every
# commit (revision, cache manifest and lock hashes) are added by build.sh through the API, after the last step.
FROM deps AS app
WORKDIR /opt/app
ENTRYPOINT ["/usr/local/bin/llama3-hyperpod"]
CMD ["--help"]
COPY neuron_cache/ /opt/app/neuron_cache/
COPY configs/ /opt/app/configs/
COPY enroot/ /opt/app/enroot/
COPY llama3_hyperpod/ /opt/app/llama3_hyperpod/
COPY entrypoint.py /opt/app/entrypoint.py
RUN python -m compileall -q --invalidation-mode unchecked-hash /opt/app/entrypoint.py /opt/app/llama3_hyperpod
