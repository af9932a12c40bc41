# The orders example's image, for deploy/kubernetes/orders.yaml. From the
# repository's root:
#
#   (cd examples/orders && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o ../../bin/orders .)
#   docker build -f deploy/docker/orders.Dockerfile -t orders:latest bin
FROM scratch
COPY orders /orders
USER 10000:10000
EXPOSE 8080
ENTRYPOINT ["/orders"]
CMD ["--web.listen-address=:8080", "--db.path=/data/orders.db", "--httpx.source=agent"]
