package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// watch prints server-socket events. When an agent answers on its socket
// it streams them from the agent (root and the agent's user see every
// server socket, other users the listeners their own servers registered),
// so that no second copy of the probe runs; otherwise, or with --no-agent,
// it loads the probe in this process, which takes the agent's privileges.
func watch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangup watch", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f eventFilter
	fs.Var(&f.ports, "port", "only events of these local ports (comma-separated, repeatable)")
	fs.Var(&f.kinds, "kind", "only these kinds: opened, peer_fin, peer_reset, local_reset, error, retransmit, closed (comma-separated, repeatable)")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	count := fs.Int("count", 0, "exit after this many events (0: run until interrupted)")
	fs.Uint64Var(&f.netns, "netns", 0, "only events of this network namespace cookie (0: all)")
	sock := fs.String("socket.path", wire.DefaultSocketPath, "the agent's socket, tried first")
	noAgent := fs.Bool("no-agent", false, "load a probe in this process even when an agent runs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	p := &printer{out: stdout, json: *asJSON, enc: json.NewEncoder(stdout), filter: f, limit: *count}
	if !*noAgent {
		err := watchAgent(ctx, *sock, p, stderr)
		if !errors.Is(err, errNoAgent) {
			return err
		}
		fmt.Fprintf(stderr, "hangup: %v; loading a probe of its own (needs root or CAP_BPF+CAP_PERFMON)\n", err)
	}
	return watchProbe(ctx, p, stderr)
}

// errNoAgent says that no agent can stream the events, and why.
var errNoAgent = errors.New("no agent")

// watchAgent streams events from the agent at sock until ctx ends, the
// count is reached or the agent goes away. It returns an error wrapping
// errNoAgent when no agent answers or it cannot stream all events.
func watchAgent(ctx context.Context, sock string, p *printer, stderr io.Writer) error {
	events := make(chan wire.Event, 4096)
	var lost atomic.Uint64
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := wire.Dial(dctx, sock, wire.ClientConfig{
		Name: "hangup-watch",
		OnEvent: func(e wire.Event) {
			select {
			case events <- e:
			default:
				lost.Add(1) // the terminal is slower than the agent
			}
		},
		OnDropped: func(d wire.Dropped) {
			fmt.Fprintf(stderr, "hangup: the agent dropped %d events for this slow reader\n", d.Count)
		},
	})
	if err != nil {
		return fmt.Errorf("%w answers at %s (%v)", errNoAgent, sock, err)
	}
	defer c.Close()
	w, err := c.Watch(dctx)
	if err != nil {
		return fmt.Errorf("%w can stream all events at %s (%v)", errNoAgent, sock, err)
	}
	if w.All {
		fmt.Fprintf(stderr, "hangup: watching every server socket through the agent (pid %d); interrupt to stop\n", c.Welcome().AgentPID)
	} else {
		fmt.Fprintf(stderr, "hangup: watching, through the agent (pid %d), the listeners that servers of uid %d registered; root sees every server socket; interrupt to stop\n",
			c.Welcome().AgentPID, os.Getuid())
	}
	var reported uint64
	for !p.done() {
		select {
		case e := <-events:
			be := fromWire(&e)
			if err := p.print(&be); err != nil {
				return err
			}
			if n := lost.Load(); n > reported {
				fmt.Fprintf(stderr, "hangup: %d events not printed: output too slow\n", n-reported)
				reported = n
			}
		case <-c.Done():
			return fmt.Errorf("the agent ended the session: %w", c.Err())
		case <-ctx.Done():
			return nil
		}
	}
	return nil
}

// watchProbe loads the probe in this process and prints its events.
func watchProbe(ctx context.Context, p *printer, stderr io.Writer) error {
	probe, err := bpf.Load(bpf.Options{})
	if err != nil {
		return fmt.Errorf("loading the kernel probe (run `hangup doctor`): %w", err)
	}
	defer probe.Close()
	stop := context.AfterFunc(ctx, func() { probe.Close() })
	defer stop()
	fmt.Fprintln(stderr, "hangup: watching server sockets with a probe of its own; interrupt to stop")
	var e bpf.Event
	for !p.done() {
		if err := probe.ReadInto(&e); err != nil {
			if errors.Is(err, bpf.ErrClosed) {
				return nil
			}
			return err
		}
		if err := p.print(&e); err != nil {
			return err
		}
	}
	return nil
}

// eventFilter is what --port, --kind and --netns select.
type eventFilter struct {
	ports portList
	kinds kindList
	netns uint64
}

func (f *eventFilter) match(e *bpf.Event) bool {
	return f.ports.match(e.Local.Port()) && f.kinds.match(e.Kind) && (f.netns == 0 || e.NetNS == f.netns)
}

// printer writes the events that pass its filter, up to a count.
type printer struct {
	out     io.Writer
	json    bool
	enc     *json.Encoder
	filter  eventFilter
	limit   int // events to print before done; 0: no limit
	printed int
}

func (p *printer) done() bool { return p.limit > 0 && p.printed >= p.limit }

func (p *printer) print(e *bpf.Event) error {
	if !p.filter.match(e) {
		return nil
	}
	p.printed++
	if p.json {
		return p.enc.Encode(toJSON(e))
	}
	_, err := fmt.Fprintf(p.out, "%s %s netns=%d\n", e.Time.Format("15:04:05.000000"), e.String(), e.NetNS)
	return err
}

// fromWire turns an agent's event into the probe's form, for printing.
func fromWire(w *wire.Event) bpf.Event {
	e := bpf.Event{
		Kind: bpf.Kind(w.Kind), Cookie: w.Cookie, NetNS: w.NetNS, Local: w.Local, Remote: w.Remote,
		State: bpf.TCPState(w.State), OldState: bpf.TCPState(w.OldState), Err: syscall.Errno(w.Errno),
		Cause: bpf.Cause(w.Cause), Retransmits: w.Retransmits, Mono: time.Duration(w.MonoNs),
	}
	if w.TimeNs != 0 {
		e.Time = time.Unix(0, w.TimeNs)
	}
	return e
}

// jsonEvent is the --json form of an event.
type jsonEvent struct {
	Time        time.Time `json:"time"`
	Kind        string    `json:"kind"`
	Cause       string    `json:"cause,omitempty"`
	Cookie      uint64    `json:"cookie"`
	NetNS       uint64    `json:"netns"`
	Local       string    `json:"local"`
	Remote      string    `json:"remote"`
	State       string    `json:"state"`
	OldState    string    `json:"old_state,omitempty"`
	Errno       int       `json:"errno,omitempty"`
	Error       string    `json:"error,omitempty"`
	Retransmits uint32    `json:"retransmits,omitempty"`
}

func toJSON(e *bpf.Event) jsonEvent {
	j := jsonEvent{
		Time: e.Time, Kind: e.Kind.String(), Cookie: e.Cookie, NetNS: e.NetNS,
		Local: e.Local.String(), Remote: e.Remote.String(), State: e.State.String(),
		Retransmits: e.Retransmits,
	}
	if e.Kind == bpf.KindClosed {
		j.Cause = e.Cause.String()
	}
	if e.OldState != 0 && e.OldState != e.State {
		j.OldState = e.OldState.String()
	}
	if e.Err != 0 {
		j.Errno = int(e.Err)
		j.Error = e.Err.Error()
	}
	return j
}

type portList map[uint16]bool

func (p *portList) String() string { return fmt.Sprint(map[uint16]bool(*p)) }

func (p *portList) Set(s string) error {
	if *p == nil {
		*p = portList{}
	}
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("bad port %q", f)
		}
		(*p)[uint16(n)] = true
	}
	return nil
}

func (p portList) match(port uint16) bool { return len(p) == 0 || p[port] }

type kindList map[bpf.Kind]bool

func (k *kindList) String() string { return fmt.Sprint(map[bpf.Kind]bool(*k)) }

func (k *kindList) Set(s string) error {
	if *k == nil {
		*k = kindList{}
	}
	for _, f := range strings.Split(s, ",") {
		kind, err := bpf.ParseKind(strings.TrimSpace(f))
		if err != nil {
			return err
		}
		(*k)[kind] = true
	}
	return nil
}

func (k kindList) match(kind bpf.Kind) bool { return len(k) == 0 || k[kind] }
