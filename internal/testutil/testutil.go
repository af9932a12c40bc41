// Package testutil holds the small helpers that tests of several packages
// share and that have nothing to do with networks (see internal/testnet) or
// the probe (see internal/probetest).
package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Buffer is a bytes.Buffer safe for concurrent writers and readers: a
// child process's output, or a logger's destination, polled by the test.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// HangupdEnv names an environment variable holding the path of a prebuilt
// hangupd. When it is set, BuildHangupd checks that the file is there and
// returns its path instead of building, for test binaries that run where
// there is no go tool (the kernel VMs of make test-kernels).
const HangupdEnv = "HANGUP_HANGUPD"

// BuildHangupd builds the agent binary from cmd/hangupd into a directory
// that every user may read and traverse (the go tool's own build
// directories are 0700), removed when the test ends, and returns its path.
// The go build cache makes repeated builds cheap. It builds without cgo.
func BuildHangupd(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv(HangupdEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("%s: %v", HangupdEnv, err)
		}
		return bin
	}
	dir, err := os.MkdirTemp("", "hangupd-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "hangupd")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/hangup-io/hangup/cmd/hangupd")
	// As the release and the image build it: only a binary without cgo can
	// drop capabilities on all its threads (--caps.drop).
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building hangupd: %v\n%s", err, out)
	}
	return bin
}
