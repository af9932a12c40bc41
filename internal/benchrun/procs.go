package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/internal/benchrun/agentproc"
)

// build holds the binaries the harness runs, built once into a temporary
// directory that every user may read.
type build struct {
	dir     string
	server  string
	hangupd string
}

func newBuild() (*build, error) {
	dir, err := os.MkdirTemp("", "hangup-bench")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	b := &build{dir: dir, server: filepath.Join(dir, "server"), hangupd: filepath.Join(dir, "hangupd")}
	for pkg, out := range map[string]string{
		"./internal/benchrun/server": b.server,
		"./cmd/hangupd":              b.hangupd,
	} {
		if err := goBuild(out, pkg); err != nil {
			b.cleanup()
			return nil, err
		}
	}
	return b, nil
}

func (b *build) cleanup() { os.RemoveAll(b.dir) }

func goBuild(out, pkg string, flags ...string) error {
	args := append(append([]string{"build", "-o", out}, flags...), pkg)
	if msg, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, msg)
	}
	return nil
}

// pinned prefixes a command with taskset when cpus is set.
func pinned(cpus string, args ...string) []string {
	if cpus == "" {
		return args
	}
	return append([]string{"taskset", "-c", cpus}, args...)
}

// variant is one server configuration: bare net/http, or httpx with a
// source.
type variant struct {
	mode, source string
}

func (v variant) String() string {
	if v.mode == "bare" {
		return "bare"
	}
	return v.source
}

var (
	bare     = variant{mode: "bare"}
	sources  = []string{"epoll", "bpf", "agent"}
	variants = []variant{bare, {"httpx", "epoll"}, {"httpx", "bpf"}, {"httpx", "agent"}}
)

// server is a running bench server.
type server struct {
	v      variant
	addr   string
	cmd    *exec.Cmd
	stderr strings.Builder
	exited chan struct{}
}

// startServer runs the bench server for v pinned to cfg.serverCPU and
// waits until it listens; with the agent source, also until the agent
// took its listener.
func startServer(ctx context.Context, cfg *config, b *build, v variant, agent *agentproc.Agent, extra ...string) (*server, error) {
	args := append([]string{b.server, "--mode=" + v.mode}, extra...)
	if v.mode == "httpx" {
		args = append(args, "--source="+v.source)
		if v.source == "agent" {
			args = append(args, "--agent-socket="+agent.Socket)
		}
	}
	args = pinned(cfg.serverCPU, args...)
	s := &server{v: v, cmd: exec.Command(args[0], args[1:]...), exited: make(chan struct{})}
	s.cmd.Stderr = &s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the %s server: %w", v, err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	go func() { s.cmd.Wait(); close(s.exited) }()
	select {
	case l := <-lines:
		s.addr = strings.TrimPrefix(l, "listening ")
	case <-s.exited:
		return nil, fmt.Errorf("the %s server exited: %s", v, strings.TrimSpace(s.stderr.String()))
	case <-time.After(30 * time.Second):
		s.stop()
		return nil, fmt.Errorf("the %s server did not listen within 30s", v)
	}
	if v.source == "agent" {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := agent.WaitRegistered(rctx, tcpAddr(s.addr)); err != nil {
			s.stop()
			return nil, err
		}
	}
	return s, nil
}

func (s *server) pid() int    { return s.cmd.Process.Pid }
func (s *server) url() string { return "http://" + s.addr + "/" }

func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
	}
}

type tcpAddr string

func (a tcpAddr) Network() string { return "tcp" }
func (a tcpAddr) String() string  { return string(a) }

// startAgent runs hangupd pinned with the load generators: its probe sees
// every server socket on the host, the bare server's too, so on the
// servers' CPU it would charge the httpx server for the bare one's
// connections. Its own cost is the agent CPU row.
func startAgent(cfg *config, b *build) (*agentproc.Agent, error) {
	return agentproc.Start(b.hangupd, pinned(cfg.loadCPU), "--seed.disable")
}
