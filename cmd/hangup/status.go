package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/hangup-io/hangup/internal/wire"
)

// status asks the agent, over its socket, for its subscribers and counters.
func status(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangup status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sock := fs.String("socket.path", wire.DefaultSocketPath, "the agent's socket")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, *sock, wire.ClientConfig{Name: "hangup-status"})
	if err != nil {
		return fmt.Errorf("%w (is hangupd running, and may this user use its socket?)", err)
	}
	defer c.Close()
	rows, end, err := c.Status(ctx)
	if err != nil {
		return fmt.Errorf("asking the agent for its status: %w", err)
	}
	self := c.Welcome().SubscriberID
	if *asJSON {
		type out struct {
			Agent     wire.StatusEnd        `json:"agent"`
			Listeners []wire.StatusListener `json:"subscribers"`
		}
		var own []wire.StatusListener
		for _, r := range rows {
			if r.Subscriber != self {
				own = append(own, r)
			}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out{Agent: end, Listeners: own})
	}
	fmt.Fprintf(stdout, "agent: up %s, %d subscribers (this one included), %d tracked connections, %d events, %d lost in the kernel, %d dropped for slow subscribers\n\n",
		time.Duration(end.UptimeSec)*time.Second, end.Subscribers, end.Tracked, end.Events, end.Lost, end.Dropped)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SUBSCRIBER\tNAME\tPID\tUID\tLISTENER\tADDRESS\tNETNS\tDELIVERED\tDROPPED\tQUEUED")
	for _, r := range rows {
		if r.Subscriber == self {
			continue
		}
		listener, addr, netns := "-", "-", "-"
		if r.Listener != 0 {
			listener, addr, netns = fmt.Sprint(r.Listener), r.Addr.String(), fmt.Sprint(r.NetNS)
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%s\t%s\t%s\t%d\t%d\t%d\n", r.Subscriber, r.Name, r.PID, r.UID,
			listener, addr, netns, r.Delivered, r.Dropped, r.Queued)
	}
	return tw.Flush()
}
