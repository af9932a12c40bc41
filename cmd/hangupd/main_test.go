package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
)

func TestFlags(t *testing.T) {
	o, err := parseFlags([]string{"--web.listen-address=127.0.0.1:1", "--socket.path", "/tmp/x", "--log.format=json"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.listenAddress != "127.0.0.1:1" || o.socketPath != "/tmp/x" || o.telemetryPath != "/metrics" || o.logFormat != "json" {
		t.Errorf("parsed %+v", o)
	}
	if _, err := parseFlags([]string{"--nope"}, io.Discard); err == nil {
		t.Error("unknown flag accepted")
	}
	if _, err := newLogger(io.Discard, "loud", "logfmt"); err == nil {
		t.Error("bad level accepted")
	}
	if _, err := newLogger(io.Discard, "info", "xml"); err == nil {
		t.Error("bad format accepted")
	}
	var buf bytes.Buffer
	log, _ := newLogger(&buf, "info", "json")
	log.Info("hi")
	if !strings.HasPrefix(buf.String(), "{") {
		t.Errorf("json log: %q", buf.String())
	}
}

// TestDaemon runs the real binary: it loads the probe, serves metrics that
// promtool accepts and a socket a client can use, and on SIGTERM exits 0
// and removes its socket.
func TestDaemon(t *testing.T) {
	d := startDaemon(t)
	fi, err := os.Stat(d.sock)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket %v mode %v, want 0660", err, fi.Mode())
	}

	resp, err := http.Get("http://" + d.addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("hangup_build_info")) || !bytes.Contains(body, []byte("hangup_agent_subscribers 1")) {
		t.Errorf("scrape: %d\n%s", resp.StatusCode, body)
	}
	if bytes.Contains(body, []byte("hangup_probe_program_runs_total")) {
		t.Error("program statistics exported without --probe.stats")
	}
	if path, err := exec.LookPath("promtool"); err != nil {
		testnet.SkipOrFail(t, "promtool not installed: %v", err)
	} else {
		pc := exec.Command(path, "check", "metrics")
		pc.Stdin = bytes.NewReader(body)
		if out, err := pc.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	}

	if err := d.stop(t); err != nil {
		t.Errorf("hangupd exit after SIGTERM: %v", err)
	}
	<-d.client.Done()
	if _, err := os.Stat(d.sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if !strings.Contains(d.logs.String(), `"msg":"hangupd stopped"`) {
		t.Errorf("no clean stop in the logs")
	}
}

// daemon is a hangupd binary running for a test.
type daemon struct {
	addr   string // the metrics endpoint's host:port
	sock   string // the subscriber socket
	logs   *testutil.Buffer
	cmd    *exec.Cmd
	exited chan error
	client *wire.Client // connected once the socket answered
}

// startDaemon builds and starts hangupd with args added to its listen
// address, socket path and JSON debug logs, and waits until its socket
// answers. It skips (or fails, see testnet.SkipOrFail) when the probe cannot
// load, and kills the daemon when the test ends.
func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	testnet.RequireRoot(t)
	bin := testutil.BuildHangupd(t)
	dir, err := os.MkdirTemp("", "hangupd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{addr: l.Addr().String(), sock: filepath.Join(dir, "s", "hangup.sock"), logs: &testutil.Buffer{}, exited: make(chan error, 1)}
	l.Close()
	d.cmd = exec.Command(bin, append([]string{"--web.listen-address=" + d.addr, "--socket.path=" + d.sock, "--log.format=json", "--log.level=debug"}, args...)...)
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.exited <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		t.Logf("hangupd logs:\n%s", d.logs.String())
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.client, err = wire.Dial(context.Background(), d.sock, wire.ClientConfig{Name: "test"})
		if err == nil {
			break
		}
		select {
		case err := <-d.exited:
			if logs := d.logs.String(); strings.Contains(logs, "permission denied") || strings.Contains(logs, "not supported") {
				testnet.SkipOrFail(t, "hangupd cannot load the probe: %v\n%s", err, logs)
			}
			t.Fatalf("hangupd exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket never appeared: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { d.client.Close() })
	return d
}

// stop sends SIGTERM and returns the exit error.
func (d *daemon) stop(t *testing.T) error {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.exited:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("hangupd did not stop after SIGTERM")
		return nil
	}
}

// waitLog waits until the daemon's log contains s.
func (d *daemon) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(d.logs.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s in the log", s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
