package agent

import (
	"errors"
	"fmt"
	"time"
)

// account is what the agent keeps per local user (SO_PEERCRED uid), so
// that no user can take more than a share of the agent: sessions,
// listeners, and the sock_diag scans that registrations cost.
type account struct {
	sessions  int
	listeners int
	// A token bucket of seeding scans: up to SeedBurst, refilled at
	// SeedRate per second.
	tokens float64
	filled time.Time // when tokens was last brought up to date
}

// userLocked returns uid's account, creating it with a full bucket. The
// caller holds a.mu.
func (a *Agent) userLocked(uid uint32) *account {
	u := a.users[uid]
	if u == nil {
		u = &account{tokens: float64(a.cfg.SeedBurst), filled: time.Now()}
		a.users[uid] = u
	}
	return u
}

// refill brings the bucket up to date at now.
func (u *account) refill(now time.Time, burst int, rate float64) {
	u.tokens = min(float64(burst), u.tokens+now.Sub(u.filled).Seconds()*rate)
	u.filled = now
}

// pruneUserLocked forgets uid once it holds nothing and its bucket is full
// again: forgetting it sooner would hand a register-and-leave loop a fresh
// budget.
func (a *Agent) pruneUserLocked(uid uint32) {
	u := a.users[uid]
	if u == nil || u.sessions > 0 || u.listeners > 0 {
		return
	}
	u.refill(time.Now(), a.cfg.SeedBurst, a.cfg.SeedRate)
	if u.tokens >= float64(a.cfg.SeedBurst) {
		delete(a.users, uid)
	}
}

// errUserListeners is what reserveListener returns at the per-user limit.
var errUserListeners = errors.New("listener limit of the user reached")

// reserveListener counts one more listener for uid, or fails at the limit.
func (a *Agent) reserveListener(uid uint32) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	u := a.userLocked(uid)
	if u.listeners >= a.cfg.MaxListenersPerUser {
		return fmt.Errorf("%w: uid %d has %d (limit %d)", errUserListeners, uid, u.listeners, a.cfg.MaxListenersPerUser)
	}
	u.listeners++
	return nil
}

// releaseListeners gives back n listeners of uid.
func (a *Agent) releaseListeners(uid uint32, n int) {
	if n == 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.userLocked(uid).listeners -= n
	a.pruneUserLocked(uid)
}

// errSessionEnded is what takeSeed returns when the session ends while it
// waits.
var errSessionEnded = errors.New("session ended")

// errSeedBudget is what takeSeed returns when the user's budget is spent
// for longer than maxSeedWait.
var errSeedBudget = errors.New("registration rate limit of the user reached")

// maxSeedWait is the longest a registration waits for the user's budget;
// beyond it, it is refused. The session reads no request meanwhile.
const maxSeedWait = 2 * time.Second

// takeSeed takes one seeding scan from uid's budget, waiting for the bucket
// to refill if it is empty (until done is closed), or refusing when that
// would take longer than maxSeedWait.
func (a *Agent) takeSeed(uid uint32, done <-chan struct{}) error {
	for {
		a.mu.Lock()
		u := a.userLocked(uid)
		u.refill(time.Now(), a.cfg.SeedBurst, a.cfg.SeedRate)
		if u.tokens >= 1 {
			u.tokens--
			a.mu.Unlock()
			return nil
		}
		wait := time.Duration((1 - u.tokens) / a.cfg.SeedRate * float64(time.Second))
		a.mu.Unlock()
		if wait > maxSeedWait {
			return fmt.Errorf("%w: the next in %s (burst %d, %g per second)", errSeedBudget,
				wait.Round(time.Second), a.cfg.SeedBurst, a.cfg.SeedRate)
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-done:
			t.Stop()
			return errSessionEnded
		}
	}
}
