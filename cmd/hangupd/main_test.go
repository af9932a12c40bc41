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
	testnet.RequireRoot(t)
	bin := filepath.Join(t.TempDir(), "hangupd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	dir, _ := os.MkdirTemp("", "hangupd")
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s", "hangup.sock")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	var logs bytes.Buffer
	cmd := exec.Command(bin, "--web.listen-address="+addr, "--socket.path="+sock, "--log.format=json", "--log.level=debug")
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		t.Logf("hangupd logs:\n%s", logs.String())
	}()

	// Wait for the socket.
	deadline := time.Now().Add(30 * time.Second)
	var c *wire.Client
	for {
		c, err = wire.Dial(context.Background(), sock, wire.ClientConfig{Name: "test"})
		if err == nil {
			break
		}
		select {
		case err := <-exited:
			if strings.Contains(logs.String(), "permission denied") || strings.Contains(logs.String(), "not supported") {
				testnet.SkipOrFail(t, "hangupd cannot load the probe: %v\n%s", err, logs.String())
			}
			t.Fatalf("hangupd exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket never appeared: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer c.Close()
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket %v mode %v, want 0660", err, fi.Mode())
	}

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("hangup_build_info")) || !bytes.Contains(body, []byte("hangup_agent_subscribers 1")) {
		t.Errorf("scrape: %d\n%s", resp.StatusCode, body)
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

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("hangupd exit after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("hangupd did not stop after SIGTERM")
	}
	<-c.Done()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if !strings.Contains(logs.String(), `"msg":"hangupd stopped"`) {
		t.Errorf("no clean stop in the logs")
	}
}
