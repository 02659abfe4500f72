# Build: docker build -t amslb .
# Run:   docker run --rm -v $PWD/lb.toml:/etc/amslb/amslb.toml:ro \
#          -p 80:80 -p 443:443 -p 1935:1935 -p 4200:4200/udp -p 6080:6080 amslb
# Reload: docker kill --signal=HUP <container>
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked \
 && install -m 0755 target/release/amslb /amslb

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin amslb \
 && mkdir -p /etc/amslb /var/lib/amslb \
 && chown amslb:amslb /var/lib/amslb
COPY --from=build /amslb /usr/local/bin/amslb
# Lets the non-root user bind 80/443 even where the runtime does not lower
# net.ipv4.ip_unprivileged_port_start (Docker does by default, Kubernetes not).
RUN setcap cap_net_bind_service=+ep /usr/local/bin/amslb
USER amslb
WORKDIR /var/lib/amslb
# http, https, rtmp, rtmps, srt, stats
EXPOSE 80 443 1935 1936 4200/udp 6080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/amslb"]
CMD ["--config", "/etc/amslb/amslb.toml"]
