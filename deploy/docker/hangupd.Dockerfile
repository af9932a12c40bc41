# hangupd's image: one static binary and nothing else. Build the binary
# first (pure Go, no cgo), from the repository's root; bin/ is the build
# context, so nothing else is sent to the builder:
#
#   CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/hangupd ./cmd/hangupd
#   docker build -f deploy/docker/hangupd.Dockerfile -t hangupd:latest bin
#
# It needs CAP_BPF and CAP_PERFMON (and CAP_NET_ADMIN, CAP_SYS_ADMIN to seed
# connections in other namespaces): see deploy/kubernetes/hangupd.yaml and
# docs/operations.md, "Docker".
FROM scratch
COPY hangupd /hangupd
# The subscriber socket's directory (mount the host's /run/hangup here).
VOLUME ["/run/hangup"]
EXPOSE 9808
ENTRYPOINT ["/hangupd"]
CMD ["--socket.path=/run/hangup/hangup.sock", "--web.listen-address=:9808", "--log.format=json"]
