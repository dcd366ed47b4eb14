# calm in a container: a build stage with Rust and libclang (RocksDB's bindings), then a slim
# runtime image with the one binary. Used by docker-compose.yml.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p calm && cp target/release/calm /usr/local/bin/calm

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/calm /usr/local/bin/calm
# io_uring is often refused by container seccomp profiles; the WAL then falls back to
# pwrite + fdatasync by itself and says so in the log.
ENTRYPOINT ["calm"]
