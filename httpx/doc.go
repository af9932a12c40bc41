// Package httpx tells a net/http handler, while it is still running, that
// its client has gone, and gives every request PHP's connection handling
// model.
//
// A Monitor learns from the kernel when a client half-closes, resets, or
// silently vanishes (link down: turned into a kernel error within
// Options.DropTimeout by per-connection TCP_USER_TIMEOUT and keepalive
// settings while a request is in flight), including while the request body
// is still unread, where net/http never notices (golang/go#23262). Wire it
// into a server with Configure and wrap the handler with Handler:
//
//	m, err := httpx.New(httpx.Options{})
//	...
//	srv := &http.Server{Handler: m.Handler(app)}
//	m.Configure(srv)
//	reg.MustRegister(m) // optional: m is a prometheus.Collector
//
// and get each request's State in the handler with FromContext.
//
// # PHP and httpx
//
//	PHP                                 httpx
//	connection_status()                 State.Status: StatusNormal 0, StatusAborted 1,
//	                                    StatusTimeout 2, both 3; String gives NORMAL,
//	                                    ABORTED, TIMEOUT, ABORTED|TIMEOUT
//	connection_aborted()                State.Aborted
//	(connection_status() & 2)           State.TimedOut
//	ignore_user_abort(bool)             State.IgnoreUserAbort, returns the previous
//	                                    setting; while ignored, the abort is recorded
//	                                    but the context is not cancelled
//	script ends at next output          the request context is cancelled at once (cause
//	after an abort                      ErrAborted); the next Write or Flush ends the
//	                                    handler with http.ErrAbortHandler
//	set_time_limit(n)                   State.SetTimeLimit(d), restarts the count,
//	                                    0 = none; Options.TimeLimit for all requests.
//	                                    Wall-clock time (PHP on Unix counts CPU time)
//	max_execution_time fatal error      TIMEOUT bit OR-ed in, context cancelled even when
//	                                    aborts are ignored, 503 if nothing was written,
//	                                    client released within limit + TimeoutGrace
//	register_shutdown_function(f)       State.RegisterShutdown(f): FIFO, exactly once on
//	                                    normal end, abort, timeout and panic; may register
//	                                    more; a panic in one does not skip the rest
//	fastcgi_finish_request()            State.Finish: the response is completed (through
//	                                    any middleware around Handler), the handler goes
//	                                    on; State.Go for continuations that
//	                                    Monitor.Shutdown waits for
//	-                                   State.AbortReason: peer FIN, peer reset,
//	                                    retransmission timeout, keepalive timeout,
//	                                    write error
//	-                                   State.WaitDelivered: wait until the client
//	                                    acknowledged the response, or learn it never will;
//	                                    hangup_http_undelivered_responses_total
//
// # Detection sources
//
// Options.Source picks where aborts come from. SourceAgent: the host agent
// (hangupd) holds the kernel probe and streams the events of this server's
// connections over its unix socket (Options.AgentSocket, default
// /run/hangup/hangup.sock); the server needs no privileges, only access to
// the socket. SourceBPF loads the kernel probe (package bpf) into the
// process, needs CAP_BPF and CAP_PERFMON, and exists only in programs that
// import package httpx/bpfsource (which links cilium/ebpf). SourceEpoll needs no
// privileges and watches each connection in a private epoll set (it sees
// FIN, RST and kernel timeouts, and tells a retransmission timeout from a
// keepalive timeout by the kernel's counters). The default tries the agent
// if its socket exists, then BPF (when linked in), then epoll, logging each fallback as a
// warning. The source in use is logged once and exported as
// hangup_http_detection_source.
//
// The agent learns the server's listening sockets from their file
// descriptors, which net/http does not expose: serve through
// Monitor.Listener, which passes each listener to the agent (again after
// every agent restart):
//
//	ln, err := net.Listen("tcp", ":8080")
//	...
//	err = srv.Serve(m.Listener(ln))
//
// When the agent goes away, every connection is watched with epoll until
// it returns (reconnection with capped exponential backoff and jitter), so
// no request in flight goes unwatched; each switch is logged and shown by
// hangup_http_detection_source. Connections on listeners the agent does
// not know are always watched with epoll.
//
// # Metrics
//
// A Monitor is a prometheus.Collector: hangup_http_requests_total{outcome},
// hangup_http_aborts_total{reason}, hangup_http_abort_detection_latency_seconds,
// hangup_http_undelivered_responses_total and hangup_http_detection_source{source}.
//
// # Caveats
//
// # Cost and where things live
//
// HTTP/1.x handlers run on net/http's goroutine; while the client is there
// a request costs its State (which is its context, see State) and a copy of
// the Request. Detection is per connection: a source (source_epoll.go,
// source_agent.go, package bpfsource through internal/detect) reports a
// socket's fate and conn.go marks the requests in flight on it; the PHP
// model lives in state.go and handler.go, the ResponseWriter in writer.go,
// silent-drop tuning in droptune.go, delivery in delivery.go, stateless
// socket helpers in sock.go.
//
// HTTP/2 handlers (and all with Options.Detach) run in a goroutine of their
// own, so Finish can hand the response back while they go on. After Finish
// or a timeout release handlers must not use the request body, nor headers
// or writers obtained through Unwrap. Shutdown functions of a handler that ignores its timeout
// run when the grace expires, concurrently with it. HTTP/2 requests are
// marked when their connection dies and, as ReasonCanceled, when the
// client resets their stream. A hijacked connection is no longer watched.
package httpx
