package dataplane

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// Cache computes Desired across syncs without recomputing the Services
// whose inputs did not change: a Service's part of the state depends only
// on the Service, its EndpointSlices, the Nodes, the pools and this node,
// and the API server's resourceVersions tell when any of them changed. A
// sync after one EndpointSlice changed recomputes that one Service, then
// merges every part (a map insert each) and settles contested ports.
//
// Objects without a resourceVersion (built by hand, as in tests) are never
// cached. The zero Cache is ready; it is not safe for concurrent use.
type Cache struct {
	global string
	parts  map[string]part
	// Hits and Misses count the Services reused and recomputed by the last
	// Desired call.
	Hits, Misses int

	lastVirtuals, lastSNAT int
}

// part is one Service's share of the desired state.
type part struct {
	fp        string
	entries   []partEntry
	snat      []nft.SNAT
	kubeProxy []ipvs.Key
	problems  []Problem
	guard     nft.Guard
}

type partEntry struct {
	entry ipvs.Entry
	port  string // the Service port's name, for a problem
	// ranges are the source ranges admitted, when filtered (see
	// computer.sourceRanges).
	ranges   []netip.Prefix
	filtered bool
}

// Desired is the package's Desired, reusing the parts of Services whose
// inputs are unchanged since the last call.
func (ca *Cache) Desired(in Inputs, node string) (State, []Problem) {
	c := newComputer(in, node)
	// Sized as last time: a sync rarely changes much.
	c.st.IPVS = make(ipvs.Table, ca.lastVirtuals)
	c.st.Owners = make(map[ipvs.Key]string, ca.lastVirtuals)
	c.st.SNAT = make([]nft.SNAT, 0, ca.lastSNAT)
	if g := globalKey(in, node); g == "" || g != ca.global {
		ca.parts = map[string]part{}
		ca.global = g
	}
	ca.Hits, ca.Misses = 0, 0
	seen := make(map[string]bool, len(in.Services))
	for _, svc := range sortedServices(in.Services) {
		if !c.ours(svc) {
			continue
		}
		key := svc.Namespace + "/" + svc.Name
		fp := fingerprint(svc, c.slices[key])
		p, ok := ca.parts[key]
		if !ok || fp == "" || ca.global == "" || p.fp != fp {
			p = c.part(svc)
			p.fp = fp
			ca.parts[key] = p
			ca.Misses++
		} else {
			ca.Hits++
		}
		seen[key] = true
		c.merge(svc, p)
	}
	for k := range ca.parts {
		if !seen[k] {
			delete(ca.parts, k)
		}
	}
	slices.SortFunc(c.st.SNAT, func(a, b nft.SNAT) int {
		if c := a.Virtual.Compare(b.Virtual); c != 0 {
			return c
		}
		return a.Real.Compare(b.Real)
	})
	c.st.SNAT = slices.Compact(c.st.SNAT)
	c.st.Guard.Sort()
	ca.lastVirtuals, ca.lastSNAT = len(c.st.IPVS), len(c.st.SNAT)
	return c.st, c.problems
}

// globalKey identifies what every part depends on: this node, the class
// rule, the Nodes and the pools. Empty when an object has no
// resourceVersion, which disables the cache.
func globalKey(in Inputs, node string) string {
	nodes, ok := versions(in.Nodes)
	if !ok {
		return ""
	}
	pools, ok := versions(in.Pools)
	if !ok {
		return ""
	}
	return strings.Join([]string{node, in.Class, strconv.FormatBool(in.DefaultClass), nodes, pools}, "\x00")
}

// versions lists objs as sorted name=resourceVersion pairs; false when
// one has no resourceVersion.
func versions[T metav1.Object](objs []T) (string, bool) {
	out := make([]string, 0, len(objs))
	for _, o := range objs {
		if o.GetResourceVersion() == "" {
			return "", false
		}
		out = append(out, o.GetName()+"="+o.GetResourceVersion())
	}
	slices.Sort(out)
	return strings.Join(out, ","), true
}

// fingerprint identifies a Service's own inputs: it and its slices, by
// UID and resourceVersion. Empty when one has no resourceVersion.
func fingerprint(svc *v1.Service, ss []*discoveryv1.EndpointSlice) string {
	if svc.ResourceVersion == "" {
		return ""
	}
	ids := make([]string, 0, len(ss)+1)
	ids = append(ids, string(svc.UID)+"="+svc.ResourceVersion)
	for _, s := range ss {
		if s.ResourceVersion == "" {
			return ""
		}
		ids = append(ids, string(s.UID)+"/"+s.Name+"="+s.ResourceVersion)
	}
	slices.Sort(ids[1:])
	return strings.Join(ids, ",")
}
