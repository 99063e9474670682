# syntax=docker/dockerfile:1
# The p2p-mirror image: agent, seeder, tracker and the node installer (one console script).
# Used by deploy/daemonset; ansible installs the same wheel into a virtualenv instead.
#   docker build -t ghcr.io/p2p-mirror/p2p-mirror:0.1.0 .

# The base image by digest (the tag alone moves); bump both together.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16
# Must match pyproject.toml's version.
ARG VERSION=0.1.0

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY p2p_mirror ./p2p_mirror
# The wheel and every dependency wheel at the versions constraints.txt pins (libtorrent's
# manylinux wheel bundles its C++ libraries), so the final stage needs no compiler or index.
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION
LABEL org.opencontainers.image.title="p2p-mirror" \
      org.opencontainers.image.description="P2P container image distribution: node registry mirror, seeder, tracker, installer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# chroot (coreutils) is in the base image: the install init container runs the host's
# systemctl through it to restart containerd.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "p2p-mirror==${VERSION}" \
    && pip check \
    && groupadd --system --gid 10001 p2p-mirror \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/p2p-mirror --shell /usr/sbin/nologin p2p-mirror \
    && p2p-mirror --version
# Non-root by default; only the install/uninstall init containers run as root (privileged).
USER 10001:10001
EXPOSE 5004 5005 6881 6882 6969
ENTRYPOINT ["p2p-mirror"]
CMD ["--help"]
