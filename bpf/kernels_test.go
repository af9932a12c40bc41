//go:build linux

package bpf

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// fakeKernel builds a kernel BTF that has the given tracepoints, each with
// that many arguments (after the private data pointer), as
// btf_trace_<name> typedefs are laid out in vmlinux.
func fakeKernel(t *testing.T, tracepoints map[string]int) *btf.Spec {
	t.Helper()
	ptr := &btf.Pointer{Target: &btf.Void{}}
	var types []btf.Type
	for name, args := range tracepoints {
		params := []btf.FuncParam{{Name: "__data", Type: ptr}}
		for range args {
			params = append(params, btf.FuncParam{Type: ptr})
		}
		proto := &btf.FuncProto{Return: &btf.Void{}, Params: params}
		types = append(types, &btf.Typedef{Name: "btf_trace_" + name, Type: &btf.Pointer{Target: proto}})
	}
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// Tracepoint signatures of the kernels the probe targets.
var (
	linux618 = map[string]int{"inet_sock_set_state": 3, "tcp_receive_reset": 1, "tcp_send_reset": 3,
		"inet_sk_error_report": 1, "tcp_retransmit_skb": 3, "tcp_destroy_sock": 1}
	linux612 = with(linux618, "tcp_retransmit_skb", 2)
	linux61  = with(linux612, "tcp_send_reset", 2)
	linux510 = with(linux61, "inet_sk_error_report", -1)
)

func with(m map[string]int, name string, args int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	if args < 0 {
		delete(out, name)
	} else {
		out[name] = args
	}
	return out
}

func TestHookVariantsPerKernel(t *testing.T) {
	for _, tc := range []struct {
		kernel string
		tps    map[string]int
		want   map[string]string
	}{
		{"6.18", linux618, map[string]string{"tcp_send_reset": probeProgOnSendReset, "tcp_retransmit_skb": probeProgOnRetransmit}},
		{"6.12", linux612, map[string]string{"tcp_send_reset": probeProgOnSendReset, "tcp_retransmit_skb": probeProgOnRetransmitLegacy}},
		{"6.1", linux61, map[string]string{"tcp_send_reset": probeProgOnSendResetLegacy, "tcp_retransmit_skb": probeProgOnRetransmitLegacy}},
	} {
		t.Run(tc.kernel, func(t *testing.T) {
			hooks, err := selectHooks(fakeKernel(t, tc.tps))
			if err != nil {
				t.Fatalf("Linux %s refused: %v", tc.kernel, err)
			}
			if len(hooks) != len(tracepoints) {
				t.Errorf("%d hooks, want %d", len(hooks), len(tracepoints))
			}
			for _, h := range hooks {
				if want, ok := tc.want[h.tracepoint]; ok && h.program != want {
					t.Errorf("%s: program %s, want %s", h.tracepoint, h.program, want)
				}
			}
		})
	}
}

func TestOldKernelNamesMissingTracepoint(t *testing.T) {
	_, err := selectHooks(fakeKernel(t, linux510))
	var he *HookError
	if !errors.Is(err, ErrNotSupported) || !errors.As(err, &he) || he.Hook != "inet_sk_error_report" {
		t.Fatalf("err = %v, want ErrNotSupported naming inet_sk_error_report", err)
	}
	if !strings.Contains(err.Error(), "Linux 5.13") {
		t.Errorf("error does not say which release has it: %v", err)
	}
	_, err = selectHooks(fakeKernel(t, with(linux61, "tcp_send_reset", 1)))
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "tcp_send_reset") {
		t.Errorf("a signature with too few arguments: %v", err)
	}
}

// The verifier's rejection of a helper call becomes ErrNotSupported naming
// the helper and the release that offers it to tracing programs.
func TestMissingHelperNamed(t *testing.T) {
	ve := &ebpf.VerifierError{Cause: unix.EINVAL, Log: []string{
		"0: R1=ctx() R10=fp0", "; cookie = bpf_get_socket_cookie((void *)sk);",
		"12: (85) call bpf_get_socket_cookie#46", "unknown func bpf_get_socket_cookie#46",
	}}
	err := hookError("loading", "tcp_receive_reset", ve)
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "bpf_get_socket_cookie (Linux 5.12)") {
		t.Fatalf("err = %v", err)
	}
	var got *VerifierError
	if !errors.As(err, &got) {
		t.Error("the verifier log is lost")
	}
	other := &ebpf.VerifierError{Cause: unix.EACCES, Log: []string{"R1 invalid mem access 'scalar'"}}
	if err := hookError("loading", "tcp_receive_reset", other); errors.Is(err, ErrNotSupported) {
		t.Errorf("a plain rejection taken for a missing feature: %v", err)
	}
}
