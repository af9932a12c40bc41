// Package agentproc runs a real hangupd for benchmarks: started as a child
// process with a private socket, checked for the listeners it took, and
// measured for the CPU time it spent.
package agentproc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/internal/wire"
)

// Agent is a running hangupd.
type Agent struct {
	Socket string // its subscriber socket
	cmd    *exec.Cmd
	dir    string
	log    *os.File
	exited chan struct{}
}

// Start runs the hangupd binary bin with a socket in a new temporary
// directory and waits (at most 30 s) until the socket accepts a session.
// Extra arguments go to hangupd after the harness's own; prefix, if not
// empty, runs bin through another command (taskset -c 0, say). The agent's
// log goes to a file in the temporary directory, shown in errors.
func Start(bin string, prefix []string, extra ...string) (*Agent, error) {
	dir, err := os.MkdirTemp("", "hangup-bench-agent")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	a := &Agent{Socket: filepath.Join(dir, "hangup.sock"), dir: dir, exited: make(chan struct{})}
	if a.log, err = os.Create(filepath.Join(dir, "hangupd.log")); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	args := append([]string{bin, "--socket.path=" + a.Socket, "--web.listen-address=127.0.0.1:0", "--log.level=warn"}, extra...)
	args = append(append([]string(nil), prefix...), args...)
	a.cmd = exec.Command(args[0], args[1:]...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		a.cleanup()
		return nil, fmt.Errorf("starting hangupd: %w", err)
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		c, err := wire.Dial(ctx, a.Socket, wire.ClientConfig{Name: "bench-check"})
		if err == nil {
			c.Close()
			return a, nil
		}
		select {
		case <-a.exited:
			err = fmt.Errorf("hangupd exited: %s", a.Log())
		case <-ctx.Done():
			err = fmt.Errorf("hangupd's socket did not answer within 30s: %w; log: %s", err, a.Log())
		case <-time.After(50 * time.Millisecond):
			continue
		}
		a.Stop()
		return nil, err
	}
}

// Log returns what hangupd logged so far.
func (a *Agent) Log() string {
	b, _ := os.ReadFile(a.log.Name())
	return strings.TrimSpace(string(b))
}

// PID is hangupd's process id (of the prefix command, which execs it).
func (a *Agent) PID() int { return a.cmd.Process.Pid }

// WaitRegistered waits until the agent lists a listener on addr's port
// among its subscribers' listeners, which is when connections accepted on
// it stop being watched by the epoll fallback.
func (a *Agent) WaitRegistered(ctx context.Context, addr net.Addr) error {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return fmt.Errorf("listener address: %w", err)
	}
	c, err := wire.Dial(ctx, a.Socket, wire.ClientConfig{Name: "bench-check"})
	if err != nil {
		return fmt.Errorf("asking the agent: %w", err)
	}
	defer c.Close()
	for {
		rows, _, err := c.Status(ctx)
		if err != nil {
			return fmt.Errorf("asking the agent for its status: %w", err)
		}
		for _, r := range rows {
			if r.Listener != 0 && r.Addr.Port() == ap.Port() {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the agent did not register the listener on %s: %w", addr, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// CPUTime returns the user and system CPU time hangupd has used so far.
func (a *Agent) CPUTime() (time.Duration, error) {
	return ProcessCPU(a.PID())
}

// ProcessCPU reads a process's user+system CPU time (all its threads) from
// /proc/PID/stat.
func ProcessCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may
	// hold spaces: state is field 3, utime 14, stime 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parsing /proc stat: %w", err)
	}
	const hz = 100 // USER_HZ, fixed at 100 on Linux for /proc
	return time.Duration(ut+st) * time.Second / hz, nil
}

// Stop ends hangupd (SIGTERM, then SIGKILL after 5 s) and removes its
// directory.
func (a *Agent) Stop() {
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(5 * time.Second):
		a.cmd.Process.Kill()
		<-a.exited
	}
	a.cleanup()
}

func (a *Agent) cleanup() {
	a.log.Close()
	os.RemoveAll(a.dir)
}
