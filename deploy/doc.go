// Package deploy holds what runs hangup on a fleet: Prometheus rules with
// their promtool tests (prometheus/), a Grafana dashboard (grafana/),
// Kubernetes manifests (kubernetes/), the systemd unit (systemd/) and the
// agent's container image (docker/). It has no code: its tests check those
// files with promtool and systemd-analyze, against the agent's defaults, and
// every rule and dashboard query against real scrapes of hangupd and of a
// server using httpx. docs/operations.md is the operator's guide.
package deploy
