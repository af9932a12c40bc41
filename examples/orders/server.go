package main

import (
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
	// acknowledged by the client.
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
// the order's state from what happened to the client.
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

	var deliveryErr error
	st.RegisterShutdown(func() {
		state, reason := StateConfirmed, ""
		switch {
		case st.Aborted():
			state, reason = StateUnconfirmed, "client went away: "+st.AbortReason().String()
		case deliveryErr != nil:
			state, reason = StateUnconfirmed, deliveryErr.Error()
		}
		if err := s.store.SetState(order.ID, state, reason); err != nil {
			s.log.Error("settling order", "order", order.ID, "err", err)
			return
		}
		s.log.Info("order settled", "order", order.ID, "state", state, "reason", reason, "status", st.Status())
	})

	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", fmt.Sprintf("/orders/%d", order.ID))
	w.WriteHeader(http.StatusCreated)
	order.State = StateConfirmed
	json.NewEncoder(w).Encode(order)

	// fastcgi_finish_request, then wait until the client's TCP stack
	// acknowledged the confirmation (or the connection died).
	st.Finish()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.deliveryWait)
	defer cancel()
	if err := st.WaitDelivered(ctx); err != nil && !errors.Is(err, httpx.ErrDeliveryUnknown) {
		deliveryErr = err
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
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(o)
}
