// Package hostnettesting has a state-modelling fake of hostnet.Interface.
package hostnettesting

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"

	"github.com/keeplb/keeplb/pkg/hostnet"
)

// Fake models a node's links, addresses and sysctls.
type Fake struct {
	mu       sync.Mutex
	links    map[string]*hostnet.Link
	sysctls  map[string]string
	readOnly map[string]bool
}

var _ hostnet.Interface = (*Fake)(nil)

// New returns a Fake with the given links and sysctls.
func New(links []hostnet.Link, sysctls map[string]string) *Fake {
	f := &Fake{links: map[string]*hostnet.Link{}, sysctls: map[string]string{}, readOnly: map[string]bool{}}
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

// Links is part of hostnet.Interface.
func (f *Fake) Links() ([]hostnet.Link, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
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
