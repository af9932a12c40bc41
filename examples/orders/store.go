package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Order states. An order is committed as pending, then becomes confirmed
// when the client acknowledged the confirmation, or unconfirmed when the
// client went away or never received it.
const (
	StatePending     = "pending"
	StateConfirmed   = "confirmed"
	StateUnconfirmed = "unconfirmed"
)

// Order is one stored order.
type Order struct {
	ID       uint64    `json:"id"`
	Item     string    `json:"item"`
	Quantity int       `json:"quantity"`
	State    string    `json:"state"`
	Reason   string    `json:"reason,omitempty"` // why it is unconfirmed
	Created  time.Time `json:"created"`
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

// SetState changes an order's state.
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
		o.State, o.Reason = state, reason
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
