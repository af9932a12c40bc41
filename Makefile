# hangup: eBPF-assisted connection monitor. `make help` lists the targets.

GO        ?= go
BIN       ?= bin
# Flags for `make run`: any hangupd flag, e.g. ARGS='--log.level=debug'.
ARGS      ?=
# Packages a test run needs on a fresh Debian machine (ip, nft, promtool, nstat).
TEST_DEBS := iproute2 nftables prometheus
# Extra flags for `make bench`, e.g. BENCH_ARGS='-only=load,detect -reps=3' (see go run ./internal/benchrun -h).
BENCH_ARGS ?=
BENCH_QUICK ?=
# Packages `make generate` needs.
GEN_DEBS  := clang llvm libbpf-dev

.DEFAULT_GOAL := help
.PHONY: help run build test bench generate check-generated lint fuzz deps deps-generate clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build hangupd and hangup into bin/
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/hangupd ./cmd/hangup

run: build ## build and run the agent (as root): metrics on :9808, socket /run/hangup/hangup.sock
	./$(BIN)/hangupd $(ARGS)

test: deps ## run every test, the privileged ones too (as root); HANGUP_REQUIRE_BPF=1 turns their skips into failures
	$(GO) test -race -count=1 -timeout 20m ./...
	@if [ -f examples/orders/go.mod ]; then cd examples/orders && $(GO) test -race -count=1 -timeout 10m ./...; fi

bench: ## measure hangup against its baselines in one run (root, ~10 min; BENCH_QUICK=1 skips silent drops): docs/benchmarks.md, .json
	@./scripts/ensure-debs.sh wrk:wrk strace:strace taskset:util-linux ip:iproute2 nft:nftables
	$(GO) run ./internal/benchrun -quick=$(if $(filter 1,$(BENCH_QUICK)),true,false) $(BENCH_ARGS)

generate: deps-generate ## rebuild the BPF object and Go bindings from bpf/probe.c
	$(GO) generate ./bpf/...

check-generated: generate ## fail if the committed BPF files differ from what the C source builds
	@git diff --exit-code --stat -- bpf/ || { echo "bpf/: generated files are stale: run 'make generate' and commit" >&2; exit 1; }

lint: ## gofmt, go vet, tidy go.mod, and the rule that only bpf/ imports cilium/ebpf/link
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run 'go mod tidy'" >&2; exit 1; }
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:" >&2; echo "$$out" >&2; exit 1; fi
	$(GO) vet ./...
	@bad=$$($(GO) list -f '{{.ImportPath}} {{join .Imports " "}} {{join .TestImports " "}} {{join .XTestImports " "}}' ./... \
		| awk '$$1 !~ /\/bpf$$/ && / github.com\/cilium\/ebpf\/link( |$$)/ {print $$1}'); \
	if [ -n "$$bad" ]; then echo "only bpf/ may import cilium/ebpf/link; imported by: $$bad" >&2; exit 1; fi

fuzz: ## fuzz the agent protocol's frame decoder for a minute
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./internal/wire/

.PHONY: test-kernels
test-kernels: ## boot Debian's 6.1 and 6.12 kernels in QEMU and run the privileged tests inside, one line per kernel (root; docs/kernel-matrix.md)
	./scripts/test-kernels.sh

deps: ## install what the tests need from Debian's packages, if missing (root)
	@./scripts/ensure-debs.sh ip:iproute2 nft:nftables promtool:prometheus nstat:iproute2

deps-generate: ## install the BPF toolchain from Debian's packages, if missing (root)
	@./scripts/ensure-debs.sh clang:clang llvm-strip:llvm /usr/include/bpf/bpf_helpers.h:libbpf-dev

clean: ## remove build output
	rm -rf $(BIN)

.PHONY: rules
rules: deps ## check the Prometheus rules and run their unit tests with promtool
	promtool check rules deploy/prometheus/hangup.rules.yml
	promtool test rules deploy/prometheus/tests/hangup.test.yml
