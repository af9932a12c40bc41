package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Order states. An order is committed as pending and settled once into
// one of the other three (see the package comment).
const (
	// StatePending: committed, not settled yet. Still pending after the
	// server stopped means it stopped before it could settle the order.
	StatePending = "pending"
	// StateConfirmed: the client's TCP stack acknowledged every byte of the
	// confirmation.
	StateConfirmed = "confirmed"
	// StateUnconfirmed: the client certainly did not get the confirmation:
	// it went away (reset, timeout, link down) before acknowledging it, or
	// the confirmation was never sent.
	StateUnconfirmed = "unconfirmed"
	// StateUnverified: the confirmation was sent but its delivery cannot be
	// told (a connection httpx cannot track, or a live client that did not
	// acknowledge it in time). Never reported as confirmed: treat it like
	// unconfirmed when following up.
	StateUnverified = "unverified"
)

// Order is one stored order, as GET /orders/{id} returns it.
type Order struct {
	ID       uint64    `json:"id"`
	Item     string    `json:"item"`
	Quantity int       `json:"quantity"`
	State    string    `json:"state"`            // pending, confirmed, unconfirmed or unverified
	Reason   string    `json:"reason,omitempty"` // why it is unconfirmed or unverified
	Created  time.Time `json:"created"`
	Settled  time.Time `json:"settled,omitzero"` // when it left pending
}

var bucket = []byte("orders")

// ErrNotFound is returned for an unknown order id.
var ErrNotFound = errors.New("order not found")

// Store keeps orders in a bbolt file.
type Store struct{ db *bolt.DB }

// OpenStore opens (or creates) the database at path.
func OpenStore(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucket)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("creating bucket: %w", err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

func key(id uint64) []byte { return binary.BigEndian.AppendUint64(nil, id) }

// Create commits a new pending order and returns it with its id.
func (s *Store) Create(item string, qty int) (Order, error) {
	o := Order{Item: item, Quantity: qty, State: StatePending, Created: time.Now().UTC()}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		id, err := b.NextSequence()
		if err != nil {
			return err
		}
		o.ID = id
		v, err := json.Marshal(o)
		if err != nil {
			return err
		}
		return b.Put(key(id), v)
	})
	return o, err
}

// SetState settles an order: it records its state and the reason.
func (s *Store) SetState(id uint64, state, reason string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		v := b.Get(key(id))
		if v == nil {
			return ErrNotFound
		}
		var o Order
		if err := json.Unmarshal(v, &o); err != nil {
			return err
		}
		o.State, o.Reason, o.Settled = state, reason, time.Now().UTC()
		v, err := json.Marshal(o)
		if err != nil {
			return err
		}
		return b.Put(key(id), v)
	})
}

// Get returns one order.
func (s *Store) Get(id uint64) (Order, error) {
	var o Order
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucket).Get(key(id))
		if v == nil {
			return ErrNotFound
		}
		return json.Unmarshal(v, &o)
	})
	return o, err
}
