package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/hangup-io/hangup/httpx"
)

// server is the order API.
type server struct {
	store *Store
	log   *slog.Logger
	// deliveryWait bounds how long a confirmation may take to be
	// acknowledged by the client while its connection stays alive. A dead
	// connection ends the wait sooner (within httpx.Options.DropTimeout).
	deliveryWait time.Duration
	// afterCommit, when set (by tests), runs right after the commit.
	afterCommit func(Order, *httpx.State)
}

func (s *server) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", s.createOrder)
	mux.HandleFunc("GET /orders/{id}", s.getOrder)
	return mux
}

// createOrder is the PHP pattern: ignore_user_abort(true) so that the
// commit is never left half done, then a shutdown function that settles
// the order's state from what happened to the client and its confirmation.
func (s *server) createOrder(w http.ResponseWriter, r *http.Request) {
	st := httpx.FromContext(r.Context())
	var req struct {
		Item     string `json:"item"`
		Quantity int    `json:"quantity"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Item == "" || req.Quantity <= 0 {
		http.Error(w, "want {\"item\": ..., \"quantity\": n > 0}", http.StatusBadRequest)
		return
	}

	// From here on the order must be committed and settled, whatever the
	// client does.
	st.IgnoreUserAbort(true)
	order, err := s.store.Create(req.Item, req.Quantity)
	if err != nil {
		s.log.Error("committing order", "err", err)
		http.Error(w, "could not store the order", http.StatusInternalServerError)
		return
	}
	if s.afterCommit != nil {
		s.afterCommit(order, st)
	}

	// Set by the handler before it returns, read by the shutdown function,
	// which runs after the handler returned (or panicked).
	var (
		sent        bool  // the whole confirmation was handed to the kernel
		deliveryErr error // WaitDelivered's answer
	)
	st.RegisterShutdown(func() {
		state, reason := settle(st, sent, deliveryErr)
		if err := s.store.SetState(order.ID, state, reason); err != nil {
			s.log.Error("settling order", "order", order.ID, "state", state, "err", err)
			return
		}
		s.log.Info("order settled", "order", order.ID, "state", state, "reason", reason, "status", st.Status(), "abort_reason", st.AbortReason())
	})

	receipt := order
	receipt.State = StateConfirmed // what the client holds if it reads this
	body, err := json.Marshal(receipt)
	if err != nil {
		s.log.Error("encoding confirmation", "order", order.ID, "err", err)
		http.Error(w, "could not encode the confirmation", http.StatusInternalServerError)
		return
	}
	body = append(body, '\n')
	// With a Content-Length the confirmation is complete for the client as
	// soon as its bytes arrive, and WaitDelivered, called before the
	// handler returns, covers all of it while the connection is still
	// open: even for clients that ask net/http to close the connection
	// after the response (Connection: close, HTTP/1.0), whose delivery
	// could no longer be checked once the connection is closed.
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Location", fmt.Sprintf("/orders/%d", order.ID))
	w.WriteHeader(http.StatusCreated)
	if _, err := w.Write(body); err != nil {
		deliveryErr = err
		return
	}
	sent = true

	// Wait until the client's TCP stack acknowledged the confirmation, or
	// the connection died (the drop timeout turns a silently vanished
	// client into a kernel error while this waits).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.deliveryWait)
	defer cancel()
	deliveryErr = st.WaitDelivered(ctx)
	if errors.Is(deliveryErr, context.DeadlineExceeded) {
		deliveryErr = fmt.Errorf("not acknowledged within %s", s.deliveryWait)
	}
}

// settle decides an order's final state: confirmed only when the client
// acknowledged the whole confirmation; unconfirmed when it certainly did
// not get it; unverified when nobody can tell.
func settle(st *httpx.State, sent bool, deliveryErr error) (state, reason string) {
	aborted := st.Aborted() && st.AbortReason() != httpx.ReasonPeerFIN
	switch {
	case sent && deliveryErr == nil:
		// Acknowledged: a client that closed or reset its connection
		// afterwards has the confirmation all the same.
		return StateConfirmed, ""
	case !sent:
		reason = "confirmation not sent"
		if deliveryErr != nil {
			reason += ": " + deliveryErr.Error()
		}
		if st.Aborted() {
			reason += " (client went away: " + st.AbortReason().String() + ")"
		}
		return StateUnconfirmed, reason
	case errors.Is(deliveryErr, httpx.ErrNotDelivered):
		return StateUnconfirmed, "confirmation not delivered: " + deliveryErr.Error()
	case aborted:
		return StateUnconfirmed, "client went away: " + st.AbortReason().String() + " (" + deliveryErr.Error() + ")"
	default:
		// ErrDeliveryUnknown (a connection httpx cannot track), or a
		// client alive but not acknowledging within deliveryWait.
		return StateUnverified, "delivery of the confirmation unknown: " + deliveryErr.Error()
	}
}

func (s *server) getOrder(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		http.Error(w, "bad id", http.StatusBadRequest)
		return
	}
	o, err := s.store.Get(id)
	if errors.Is(err, ErrNotFound) {
		http.NotFound(w, r)
		return
	}
	if err != nil {
		s.log.Error("reading order", "order", id, "err", err)
		http.Error(w, "could not read the order", http.StatusInternalServerError)
		return
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(o); err != nil {
		http.Error(w, "could not encode the order", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(buf.Bytes())
}
