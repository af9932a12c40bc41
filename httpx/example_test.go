package httpx_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/hangup-io/hangup/httpx"
)

func ExampleStatus() {
	for _, s := range []httpx.Status{
		httpx.StatusNormal,
		httpx.StatusAborted,
		httpx.StatusTimeout,
		httpx.StatusAborted | httpx.StatusTimeout,
	} {
		fmt.Println(uint8(s), s)
	}
	// Output:
	// 0 NORMAL
	// 1 ABORTED
	// 2 TIMEOUT
	// 3 ABORTED|TIMEOUT
}

// A server whose handler uses PHP's connection functions.
func Example() {
	m, err := httpx.New(httpx.Options{
		Source: httpx.SourceEpoll, // no privileges needed; the zero value picks the best
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	ended := make(chan string, 1)
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := httpx.FromContext(r.Context())
		st.RegisterShutdown(func() { // register_shutdown_function
			ended <- st.Status().String() // connection_status
		})
		st.IgnoreUserAbort(true) // ignore_user_abort(true): finish the work even if the client leaves
		st.SetTimeLimit(5 * time.Second)
		fmt.Fprintln(w, "hello")
	})

	ts := httptest.NewUnstartedServer(m.Handler(app))
	m.Configure(ts.Config)
	ts.Start()
	defer ts.Close()

	resp, err := http.Get(ts.URL)
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Print(string(body))
	fmt.Println(<-ended)
	// Output:
	// hello
	// NORMAL
}

// Finish answers the client and goes on working, as fastcgi_finish_request.
func ExampleState_Finish() {
	m, err := httpx.New(httpx.Options{Source: httpx.SourceNone, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	worked := make(chan struct{})
	ts := httptest.NewUnstartedServer(m.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := httpx.FromContext(r.Context())
		fmt.Fprintln(w, "accepted")
		st.Finish()                       // the client has its response now
		time.Sleep(10 * time.Millisecond) // slow work the client does not wait for
		close(worked)
	})))
	m.Configure(ts.Config)
	ts.Start()
	defer ts.Close()

	resp, err := http.Get(ts.URL)
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Print(string(body))
	<-worked
	fmt.Println("work done")
	// Output:
	// accepted
	// work done
}

// A handler that must not leave a half-done commit: aborts are ignored
// around the commit, and delivery of the confirmation is checked.
func ExampleState_WaitDelivered() {
	handler := func(w http.ResponseWriter, r *http.Request) {
		st := httpx.FromContext(r.Context())
		prev := st.IgnoreUserAbort(true)
		// ... commit the order ...
		st.IgnoreUserAbort(prev)
		fmt.Fprintln(w, "order 42 confirmed")
		st.Finish()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := st.WaitDelivered(ctx); err != nil {
			// The client never saw the confirmation: mark the order
			// unconfirmed, notify by other means.
			log.Printf("order 42: %v", err)
		}
	}
	_ = handler
}

// Aborts by reason, requests by outcome and the rest are Prometheus metrics.
func ExampleMonitor_Collect() {
	m, err := httpx.New(httpx.Options{Source: httpx.SourceNone, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	// reg := prometheus.NewRegistry(); reg.MustRegister(m)
	fmt.Println(m.Source(), m.Stats().Undelivered)
	// Output: none 0
}

// A server without privileges that learns about departed clients from the
// host agent (hangupd). Its listener is passed to the agent through
// Listener; if the agent restarts, the Monitor watches the connections with
// epoll meanwhile and registers the listener again.
func ExampleMonitor_Listener() {
	m, err := httpx.New(httpx.Options{
		Source:      httpx.SourceAgent,
		AgentSocket: "/run/hangup/hangup.sock", // the default
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	srv := &http.Server{Handler: m.Handler(http.NotFoundHandler())}
	m.Configure(srv)
	ln, err := net.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(srv.Serve(m.Listener(ln)))
}
