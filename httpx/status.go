package httpx

import (
	"errors"
	"fmt"
)

// Status is a request's connection status, with the values of PHP's
// connection_status(): a bitfield of StatusAborted and StatusTimeout.
type Status uint8

// Status values. They are bits: a request that was aborted and then timed
// out (or the other way round) has both, Status 3.
const (
	StatusNormal  Status = 0 // PHP's CONNECTION_NORMAL
	StatusAborted Status = 1 // PHP's CONNECTION_ABORTED
	StatusTimeout Status = 2 // PHP's CONNECTION_TIMEOUT
)

// String returns NORMAL, ABORTED, TIMEOUT or ABORTED|TIMEOUT, or Status(n)
// for an unknown value.
func (s Status) String() string {
	switch s {
	case StatusNormal:
		return "NORMAL"
	case StatusAborted:
		return "ABORTED"
	case StatusTimeout:
		return "TIMEOUT"
	case StatusAborted | StatusTimeout:
		return "ABORTED|TIMEOUT"
	}
	return fmt.Sprintf("Status(%d)", uint8(s))
}

// outcome is the metric label for a final status.
func (s Status) outcome() string {
	switch s {
	case StatusAborted:
		return "aborted"
	case StatusTimeout:
		return "timeout"
	case StatusAborted | StatusTimeout:
		return "aborted_timeout"
	}
	return "normal"
}

// Reason says why a request was aborted.
type Reason uint8

// Abort reasons.
const (
	// ReasonNone means the request was not aborted.
	ReasonNone Reason = iota
	// ReasonPeerFIN means the client half-closed the connection (sent
	// FIN). It counts as an abort unless Options.IgnoreHalfClose is set,
	// as nginx answers it with 499.
	ReasonPeerFIN
	// ReasonPeerReset means the client reset the connection (RST).
	ReasonPeerReset
	// ReasonTimeout means the kernel gave up retransmitting unacknowledged
	// data (TCP_USER_TIMEOUT or tcp_retries2), or zero-window probes went
	// unanswered: the client vanished while data was outstanding.
	ReasonTimeout
	// ReasonKeepaliveTimeout means keepalive probes went unanswered: the
	// client vanished while the connection was quiet.
	ReasonKeepaliveTimeout
	// ReasonWriteError means writing the response failed.
	ReasonWriteError
	// ReasonCanceled means net/http cancelled the request itself and
	// neither a source nor the socket said why, e.g. an HTTP/2 stream
	// reset by the client.
	ReasonCanceled
	// ReasonError means another socket error ended the connection.
	ReasonError

	numReasons
)

var reasonNames = [numReasons]string{
	ReasonNone:             "none",
	ReasonPeerFIN:          "peer_fin",
	ReasonPeerReset:        "peer_reset",
	ReasonTimeout:          "retransmission_timeout",
	ReasonKeepaliveTimeout: "keepalive_timeout",
	ReasonWriteError:       "write_error",
	ReasonCanceled:         "canceled",
	ReasonError:            "error",
}

// String returns the reason's snake_case name, as used in metric labels,
// or Reason(n) for an unknown value.
func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint8(r))
}

// Sentinel errors. The request context's cause (context.Cause) is one of
// ErrAborted or ErrTimeLimit when httpx cancelled it.
var (
	// ErrAborted is the cause of a request context cancelled because the
	// client went away. The cause wraps it together with the Reason.
	ErrAborted = errors.New("httpx: client aborted the request")
	// ErrTimeLimit is the cause of a request context cancelled because the
	// request's time limit expired.
	ErrTimeLimit = errors.New("httpx: request time limit exceeded")
	// ErrFinished is returned by writes after Finish: the response is
	// complete and further output is discarded.
	ErrFinished = errors.New("httpx: response already finished")
	// ErrNotDelivered is returned by WaitDelivered when the connection died
	// before the client acknowledged every byte of the response.
	ErrNotDelivered = errors.New("httpx: response not delivered")
	// ErrDeliveryUnknown is returned by WaitDelivered when it cannot tell:
	// the request has no tracked TCP connection, or the server closed the
	// connection before the bytes were acknowledged and no source reported
	// its fate.
	ErrDeliveryUnknown = errors.New("httpx: response delivery unknown")
)

// AbortError is the context cause of an aborted request.
type AbortError struct {
	Reason Reason
}

func (e *AbortError) Error() string { return ErrAborted.Error() + ": " + e.Reason.String() }

// Is makes errors.Is(err, ErrAborted) true.
func (e *AbortError) Is(target error) bool { return target == ErrAborted }
