// Package hostnettesting has a state-modelling fake of hostnet.Interface.
package hostnettesting

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/keeplb/keeplb/pkg/hostnet"
)

// Fake models a node's links, addresses (with their lifetimes: an
// address whose lifetime has passed is gone, as the kernel removes it)
// and sysctls.
type Fake struct {
	// Now is the clock of the lifetimes; time.Now unless set.
	Now func() time.Time

	mu       sync.Mutex
	links    map[string]*hostnet.Link
	expires  map[netip.Prefix]time.Time // no entry: never
	sysctls  map[string]string
	readOnly map[string]bool
}

var _ hostnet.Interface = (*Fake)(nil)

// New returns a Fake with the given links and sysctls.
func New(links []hostnet.Link, sysctls map[string]string) *Fake {
	f := &Fake{Now: time.Now, links: map[string]*hostnet.Link{}, expires: map[netip.Prefix]time.Time{}, sysctls: map[string]string{}, readOnly: map[string]bool{}}
	for _, l := range links {
		l.Prefixes = slices.Clone(l.Prefixes)
		f.links[l.Name] = &l
	}
	for k, v := range sysctls {
		f.sysctls[k] = v
	}
	return f
}

// MakeReadOnly makes writing the sysctl fail, as without the capability.
func (f *Fake) MakeReadOnly(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.readOnly[name] = true
}

// AddAddress puts p on a link, as keepalived would.
func (f *Fake) AddAddress(link string, p netip.Prefix) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l := f.links[link]; l != nil && !slices.Contains(l.Prefixes, p) {
		l.Prefixes = append(l.Prefixes, p)
	}
}

// expire removes the addresses whose lifetime has passed.
func (f *Fake) expire() {
	now := f.Now()
	for p, at := range f.expires {
		if now.Before(at) {
			continue
		}
		for _, l := range f.links {
			l.Prefixes = slices.DeleteFunc(l.Prefixes, func(q netip.Prefix) bool { return q == p })
		}
		delete(f.expires, p)
	}
}

// Expires returns when p's lifetime ends, and false if it never does (or
// p is on no link).
func (f *Fake) Expires(p netip.Prefix) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.expire()
	at, ok := f.expires[p]
	return at, ok
}

// SetAddressLifetime is part of hostnet.Interface.
func (f *Fake) SetAddressLifetime(link string, p netip.Prefix, valid time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.expire()
	l := f.links[link]
	if l == nil || !slices.Contains(l.Prefixes, p) {
		return fmt.Errorf("set the lifetime of %s on %s: no such address", p, link)
	}
	if valid <= 0 {
		delete(f.expires, p)
		return nil
	}
	f.expires[p] = f.Now().Add(ceilSeconds(valid))
	return nil
}

// ceilSeconds rounds d up to whole seconds, as the kernel's lifetimes
// are.
func ceilSeconds(d time.Duration) time.Duration {
	return (d + time.Second - 1).Truncate(time.Second)
}

// Links is part of hostnet.Interface.
func (f *Fake) Links() ([]hostnet.Link, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.expire()
	out := make([]hostnet.Link, 0, len(f.links))
	for _, l := range f.links {
		c := *l
		c.Prefixes = slices.Clone(l.Prefixes)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// DeleteAddress is part of hostnet.Interface.
func (f *Fake) DeleteAddress(link string, p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.links[link]
	if l == nil {
		return fmt.Errorf("find interface %s: no such link", link)
	}
	l.Prefixes = slices.DeleteFunc(l.Prefixes, func(q netip.Prefix) bool { return q == p })
	delete(f.expires, p)
	return nil
}

// Sysctl is part of hostnet.Interface.
func (f *Fake) Sysctl(name string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.sysctls[name]
	if !ok {
		return "", fmt.Errorf("sysctl %s: no such file", name)
	}
	return v, nil
}

// SetSysctl is part of hostnet.Interface.
func (f *Fake) SetSysctl(name, value string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.readOnly[name] {
		return fmt.Errorf("open /proc/sys/%s: read-only file system", name)
	}
	f.sysctls[name] = value
	return nil
}
