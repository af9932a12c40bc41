//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/internal/testnet"
)

func TestLoadWithoutBTF(t *testing.T) {
	_, err := load(Options{}, filepath.Join(t.TempDir(), "no-such-vmlinux"), selectHooks)
	if !errors.Is(err, ErrNotSupported) {
		t.Fatalf("err = %v, want ErrNotSupported", err)
	}
	if !strings.Contains(err.Error(), "CONFIG_DEBUG_INFO_BTF") {
		t.Errorf("error does not say how to fix it: %v", err)
	}
}

func TestLoadWithGarbageBTF(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(path, []byte("this is not BTF"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := load(Options{}, path, selectHooks); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("err = %v, want ErrNotSupported", err)
	}
}

func TestMissingTracepointNamesHook(t *testing.T) {
	kernel, err := kernelTypes(kernelBTFPath)
	if err != nil {
		testnet.SkipOrFail(t, "no kernel BTF: %v", err)
	}
	_, err = tracepointArgs(kernel, "no_such_tracepoint")
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "no_such_tracepoint") {
		t.Fatalf("err = %v", err)
	}
	hooks, err := selectHooks(kernel)
	if err != nil {
		t.Fatalf("this kernel must have every hook: %v", err)
	}
	if len(hooks) != len(tracepoints) {
		t.Errorf("%d hooks selected, want %d", len(hooks), len(tracepoints))
	}
}

func TestClassify(t *testing.T) {
	he := &HookError{Op: "attaching", Hook: "tcp_send_reset", Err: unix.EPERM}
	err := classify(he)
	if !errors.Is(err, ErrPermission) || !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "CAP_BPF") {
		t.Errorf("EPERM: %v", err)
	}
	var got *HookError
	if !errors.As(err, &got) || got.Hook != "tcp_send_reset" {
		t.Errorf("hook lost: %v", err)
	}
	if err := classify(fmt.Errorf("x: %w", ebpf.ErrNotSupported)); !errors.Is(err, ErrNotSupported) {
		t.Errorf("ErrNotSupported: %v", err)
	}
	if err := classify(io.EOF); err != io.EOF {
		t.Errorf("other errors pass through: %v", err)
	}
}

func TestRingSize(t *testing.T) {
	page := uint32(os.Getpagesize())
	for in, want := range map[int]uint32{0: defaultRingBufferSize, 1: page, int(page) + 1: 2 * page, 1 << 20: 1 << 20} {
		if got := ringSize(in); got != want {
			t.Errorf("ringSize(%d) = %d, want %d", in, got, want)
		}
	}
}

// TestLoadWithoutPermission runs this test binary again as nobody: Load must
// fail with ErrPermission and say which capabilities are needed.
func TestLoadWithoutPermission(t *testing.T) {
	if os.Getenv("HANGUP_TEST_UNPRIVILEGED") == "1" {
		_, err := Load(Options{})
		if !errors.Is(err, ErrPermission) {
			t.Fatalf("unprivileged Load: %v, want ErrPermission", err)
		}
		if !strings.Contains(err.Error(), "CAP_BPF") || !strings.Contains(err.Error(), "CAP_PERFMON") {
			t.Fatalf("error does not name the capabilities: %v", err)
		}
		return
	}
	if os.Geteuid() != 0 {
		// Already unprivileged: check directly.
		if _, err := Load(Options{}); !errors.Is(err, ErrPermission) {
			t.Fatalf("unprivileged Load: %v, want ErrPermission", err)
		}
		return
	}
	// The test binary may sit in a directory nobody cannot enter: copy it.
	dir, err := os.MkdirTemp("", "hangup-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "bpf.test")
	if err := copyFile(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestLoadWithoutPermission$", "-test.v")
	cmd.Env = append(os.Environ(), "HANGUP_TEST_UNPRIVILEGED=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("unprivileged run failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestLoadWithoutPermission") {
		t.Fatalf("unprivileged run did not pass:\n%s", out)
	}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
