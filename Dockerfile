# syntax=docker/dockerfile:1
# pixmesh: one binary with a subcommand per role (see README, "Operate" → "Containers").
#
#   docker build -t pixmesh .
#   docker run -p 8080:8080 -v pixmesh-data:/var/lib/pixmesh pixmesh          # the whole system (`pixmesh up`)
#   docker run pixmesh worker                                                # one role
#
# Build stage: the toolchain pinned by rust-toolchain.toml, the locked dependencies.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# The image's gcc builds the vendored C code (SQLite, libwebp); nothing else is linked from the
# system, so the build needs no packages of its own.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pixmesh \
 && install -m 0755 target/release/pixmesh /usr/local/bin/pixmesh

# Runtime stage: glibc and CA certificates (S3, NATS over TLS), the binary, a non-root user.
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="pixmesh" \
      org.opencontainers.image.description="Distributed image processing with its middleware built in: gateway, upload, status, distributor, image workers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.documentation="/usr/share/doc/pixmesh/README.md" \
      org.opencontainers.image.licenses="Apache-2.0"
# Unpinned on purpose: the distribution's security updates of these are what the image wants.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pixmesh \
 && useradd --system --uid 10001 --gid pixmesh --home-dir /var/lib/pixmesh --shell /usr/sbin/nologin pixmesh \
 && mkdir -p /var/lib/pixmesh /usr/share/doc/pixmesh \
 && chown pixmesh:pixmesh /var/lib/pixmesh
COPY --from=build /usr/local/bin/pixmesh /usr/local/bin/pixmesh
COPY README.md ARCHITECTURE.md pixmesh.example.toml /usr/share/doc/pixmesh/

# Every setting is PIXMESH__SECTION__KEY (see pixmesh.example.toml); these are the ones a
# container needs different from a laptop: listen on every interface, data in the volume,
# logs as JSON lines.
ENV PIXMESH__STORE__DATA_DIR=/var/lib/pixmesh \
    PIXMESH__LOG__FORMAT=json \
    PIXMESH__LOG__LEVEL=info \
    PIXMESH__GATEWAY__LISTEN=0.0.0.0:8080 \
    PIXMESH__GATEWAY__ADMIN_LISTEN=0.0.0.0:9090 \
    PIXMESH_HEALTH_URL=http://127.0.0.1:9090/readyz \
    OTEL_EXPORTER_OTLP_ENDPOINT=""

USER 10001:10001
WORKDIR /var/lib/pixmesh
VOLUME ["/var/lib/pixmesh"]
# 8080: the gateway (the public API); 9090: the admin port (/healthz, /readyz, /metrics) of the
# role that sets its admin_listen to it (the gateway by default, each role in Kubernetes).
EXPOSE 8080 9090
# `pixmesh health` GETs PIXMESH_HEALTH_URL and exits 0 on a 2xx: no shell or curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["pixmesh", "health"]
ENTRYPOINT ["pixmesh"]
# The whole system on the embedded profile; name a role (gateway, upload, status, distributor,
# worker, registry) to run one.
CMD ["up", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/pixmesh"]
