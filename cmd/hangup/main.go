// Command hangup is the command line for hangup's kernel probe and host
// agent:
//
//	hangup watch   live server-socket events, from the agent (or a probe of its own)
//	hangup status  the agent's subscribers, their listeners and its counters
//	hangup top     a live table of connections, aborts and retransmissions per port
//	hangup doctor  kernel, BTF, permission and agent checks, with fixes
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: hangup <command> [flags]

commands:
  watch    print server-socket events as they happen, from the agent; without one it loads the probe (needs root or CAP_BPF+CAP_PERFMON)
  status   show the agent's subscribers, listeners and counters
  top      a live table per namespace and port: connections opened, aborted by cause, retransmissions per second
  doctor   check that this host can run hangup, and say how to fix what is missing

Run 'hangup <command> --help' for a command's flags.
`

// errFailed makes run exit non-zero without printing anything more.
var errFailed = errors.New("failed")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errFailed):
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "hangup:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errFailed
	}
	switch args[0] {
	case "watch":
		return watch(ctx, args[1:], stdout, stderr)
	case "status":
		return status(ctx, args[1:], stdout, stderr)
	case "top":
		return top(ctx, args[1:], stdout, stderr)
	case "doctor":
		return doctor(ctx, args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}
