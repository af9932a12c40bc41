package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// VerifierError is the kernel verifier's rejection of a program, with its
// log; Load's errors wrap it (find it with errors.As, print it with %+v for
// the whole log). An alias, so that callers need not import cilium/ebpf.
type VerifierError = ebpf.VerifierError

// Sentinel errors that Load wraps, so that callers (and `hangup doctor`) can
// tell the failures apart with errors.Is. Verifier rejections wrap
// *ebpf.VerifierError: use errors.As to get the full log.
var (
	// ErrNotSupported: the kernel lacks what the probe needs (BTF, tp_btf,
	// a tracepoint). It also matches ebpf.ErrNotSupported where cilium/ebpf
	// reported the cause.
	ErrNotSupported = errors.New("kernel not supported")
	// ErrPermission: the process may not load or attach BPF programs.
	ErrPermission = errors.New("permission denied")
	// ErrClosed is returned by Read after Close.
	ErrClosed = errors.New("probe closed")
)

// HookError names the kernel hook whose program failed to load or attach.
type HookError struct {
	Hook string // tracepoint name, e.g. "tcp_retransmit_skb"
	Op   string // "loading" or "attaching"
	Err  error
}

func (e *HookError) Error() string {
	return fmt.Sprintf("%s tp_btf/%s: %v", e.Op, e.Hook, e.Err)
}

func (e *HookError) Unwrap() error { return e.Err }

// Capabilities the probe needs: CAP_BPF to create maps and load programs,
// CAP_PERFMON for tracing programs and reading kernel memory, both replaced by
// CAP_SYS_ADMIN on their own.
const permissionHint = "loading tracing programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run as root or grant them, e.g. setcap cap_bpf,cap_perfmon+ep"
