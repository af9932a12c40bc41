package wire_test

import (
	"context"
	"errors"
	"log"
	"net"
	"time"

	"github.com/hangup-io/hangup/internal/wire"
)

// A server registers its listener and matches events to its connections by
// socket cookie (getsockopt SO_COOKIE on the accepted connection).
func ExampleDial() {
	ln, err := net.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, wire.DefaultSocketPath, wire.ClientConfig{
		Name: "myserver",
		OnEvent: func(e wire.Event) {
			if e.Kind == wire.KindPeerReset || e.Kind == wire.KindClosed {
				log.Printf("connection %d: kind %d cause %d", e.Cookie, e.Kind, e.Cause)
			}
		},
		OnDropped: func(d wire.Dropped) { log.Printf("agent dropped %d events", d.Count) },
	})
	if err != nil {
		log.Printf("no agent, falling back: %v", err)
		return
	}
	defer c.Close()
	reg, err := c.Register(ctx, ln.(*net.TCPListener))
	var refused *wire.Error
	if errors.As(err, &refused) {
		log.Printf("agent refused the listener: %v", refused)
		return
	}
	log.Printf("listener %d registered: %s in netns %d", reg.Listener, reg.Addr, reg.NetNS)
	<-c.Done() // the agent went away: reconnect with backoff
	log.Print(c.Err())
}
