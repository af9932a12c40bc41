package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/hangup-io/hangup/bpf"
)

// watch loads the probe in this process and prints its events. It does not
// go through the agent: the agent streams only the events of listeners a
// subscriber owns, while watch shows every server socket on the host, which
// takes the same privileges as the agent. Both can run at once.
func watch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangup watch", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var ports portList
	var kinds kindList
	fs.Var(&ports, "port", "only events of these local ports (comma-separated, repeatable)")
	fs.Var(&kinds, "kind", "only these kinds: opened, peer_fin, peer_reset, local_reset, error, retransmit, closed (comma-separated, repeatable)")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	count := fs.Int("count", 0, "exit after this many events (0: run until interrupted)")
	netns := fs.Uint64("netns", 0, "only events of this network namespace cookie (0: all)")
	if err := fs.Parse(args); err != nil {
		return err
	}

	p, err := bpf.Load(bpf.Options{})
	if err != nil {
		return fmt.Errorf("loading the kernel probe (run `hangup doctor`): %w", err)
	}
	defer p.Close()
	stop := context.AfterFunc(ctx, func() { p.Close() })
	defer stop()
	fmt.Fprintln(stderr, "hangup: watching server sockets; interrupt to stop")

	enc := json.NewEncoder(stdout)
	var e bpf.Event
	for n := 0; *count == 0 || n < *count; {
		if err := p.ReadInto(&e); err != nil {
			if errors.Is(err, bpf.ErrClosed) {
				return nil
			}
			return err
		}
		if !ports.match(e.Local.Port()) || !kinds.match(e.Kind) || (*netns != 0 && e.NetNS != *netns) {
			continue
		}
		n++
		if *asJSON {
			if err := enc.Encode(toJSON(&e)); err != nil {
				return err
			}
			continue
		}
		if _, err := fmt.Fprintf(stdout, "%s %s netns=%d\n", e.Time.Format("15:04:05.000000"), e.String(), e.NetNS); err != nil {
			return err
		}
	}
	return nil
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
