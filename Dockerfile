# Multi-stage build: a full Rust toolchain (with cmake, which Pingora's zlib-ng needs) builds
# the release binary; the runtime image is Debian slim with the binary, CA certificates and a
# non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tollgate \
 && strip target/release/tollgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/gateway.yaml /etc/tollgate/gateway.yaml
USER 10001:10001
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["--config", "/etc/tollgate/gateway.yaml"]
