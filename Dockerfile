# Kiln's container image: build with cargo, run on a slim base as a non-root
# user, with KILN_HOME (registry, caches, the SQLite job store) on a volume.
#
#   docker build -t kiln .                                  # CPU
#   docker build -t kiln:cuda --build-arg FEATURES=cuda \
#       --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04 \
#       --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .
#
#   docker run -p 8080:8080 -v kiln-home:/var/lib/kiln kiln serve
#   docker run kiln worker --queue redis://redis:6379/0 MODEL...
#
# docs/deploy.md explains the roles, Redis and Kubernetes/KServe manifests.

ARG BUILD_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG FEATURES=""
# The CUDA build images carry no Rust: install it there.
RUN if ! command -v cargo >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential && \
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0; \
    fi
ENV PATH=/root/.cargo/bin:/usr/local/cargo/bin:$PATH
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kiln --features "${FEATURES}" && \
    install -m 0755 target/release/kiln /usr/local/bin/kiln

FROM ${RUNTIME_IMAGE} AS runtime
# curl answers the health check; ca-certificates lets model downloads verify TLS.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && \
    rm -rf /var/lib/apt/lists/* && \
    useradd --system --uid 10001 --home-dir /var/lib/kiln --create-home kiln
COPY --from=build /usr/local/bin/kiln /usr/local/bin/kiln
ENV KILN_HOME=/var/lib/kiln \
    KILN_HOST=0.0.0.0 \
    PORT=8080
VOLUME ["/var/lib/kiln"]
USER kiln
EXPOSE 8080
# Ready once every eager model has loaded (a front: once workers serve them).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/v2/health/ready" || exit 1
ENTRYPOINT ["kiln"]
CMD ["serve"]
