package allocator

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// Sharing: Services of one namespace with the same keeplb.io/share-key use
// one address when their ports do not overlap and their traffic goes to
// the same place (externalTrafficPolicy Cluster, or the same selector).

// shareGroup returns the addresses that req's share key holds for other
// Services.
func (a *Allocator) shareGroup(req *Request) []netip.Addr {
	var out []netip.Addr
	for addr := range a.groups[req.Namespace+"/"+req.ShareKey] {
		if !onlyOwner(a.addrs[addr], req.Key) {
			out = append(out, addr)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// setShareKey changes the share key of addr, keeping the group index.
func (a *Allocator) setShareKey(addr netip.Addr, st *addrState, key string) {
	if st.shareKey == key {
		return
	}
	if g := a.groups[st.shareKey]; g != nil {
		delete(g, addr)
		if len(g) == 0 {
			delete(a.groups, st.shareKey)
		}
	}
	st.shareKey = key
	if key == "" {
		return
	}
	if a.groups[key] == nil {
		a.groups[key] = map[netip.Addr]struct{}{}
	}
	a.groups[key][addr] = struct{}{}
}

// canShare checks that req may use addr alongside its current owners.
func (a *Allocator) canShare(req *Request, addr netip.Addr, st *addrState) error {
	others := slices.DeleteFunc(slices.Clone(st.owners), func(o string) bool { return o == req.Key })
	if len(others) == 0 {
		return nil
	}
	if req.ShareKey == "" || st.shareKey != req.Namespace+"/"+req.ShareKey {
		return errorf(ReasonAddressInUse, req.fieldFor(), "%s is already used by Service %s; choose another address, or give both Services the same keeplb.io/share-key", addr, strings.Join(others, ", "))
	}
	for _, o := range others {
		os := a.services[o]
		if os == nil {
			continue
		}
		if os.req.Backends != req.Backends {
			return errorf(ReasonSharingConflict, v1alpha1.AnnotationShareKey, "cannot share %s with Service %s: both need externalTrafficPolicy Cluster, or the same pod selector, because one node holds the address", addr, o)
		}
		for _, p := range req.Ports {
			if slices.Contains(os.req.Ports, p) {
				return errorf(ReasonSharingConflict, v1alpha1.AnnotationShareKey, "cannot share %s with Service %s: both use port %s; change one Service's port or share key", addr, o, p)
			}
		}
	}
	return nil
}

func (a *Allocator) planShared(req *Request) ([]planned, error) {
	group := a.shareGroup(req)
	byFam := map[Family]netip.Addr{}
	for _, addr := range group {
		st := a.addrs[addr]
		if err := a.canShare(req, addr, st); err != nil {
			return nil, err
		}
		if others := a.listedBy(addr, req.Key); !owns(st, req.Key) && len(others) > 0 {
			return nil, errorf(ReasonAddressInUse, v1alpha1.AnnotationShareKey, "the shared address %s is listed in the status of Service %s, which does not share it; wait until that Service's status no longer lists it, or change the share key", addr, strings.Join(others, ", "))
		}
		if req.Pool != "" && st.pool != req.Pool {
			return nil, errorf(ReasonSharingConflict, v1alpha1.AnnotationShareKey, "the Services sharing key %q use IPPool %s, not %s named by keeplb.io/pool; make them agree", req.ShareKey, st.pool, req.Pool)
		}
		if ps := a.pools[st.pool]; ps != nil {
			if ok, why := ps.admits(req); !ok {
				return nil, errorf(ReasonNotAdmitted, v1alpha1.AnnotationShareKey, "the shared address %s is in IPPool %s, which does not admit this Service (%s)", addr, ps.Name, why)
			}
		}
		byFam[FamilyOf(addr)] = addr
	}
	var plan []planned
	for _, f := range wanted(req) {
		addr, ok := byFam[f]
		if !ok {
			if req.Policy == PreferDualStack && len(plan) > 0 {
				continue
			}
			if req.Policy == PreferDualStack && f != wanted(req)[0] {
				continue
			}
			return nil, errorf(ReasonSharingConflict, v1alpha1.AnnotationShareKey, "the Services sharing key %q have no %s address; align spec.ipFamilies/ipFamilyPolicy across them", req.ShareKey, f)
		}
		plan = append(plan, planned{addr: addr, fam: f})
	}
	if len(plan) == 0 {
		return nil, errorf(ReasonSharingConflict, v1alpha1.AnnotationShareKey, "the Services sharing key %q have no address of the families %v", req.ShareKey, wanted(req))
	}
	return plan, nil
}

// fieldFor names what made req claim an address someone else holds.
func (r *Request) fieldFor() string {
	switch {
	case len(r.IPs) > 0:
		return r.IPsSource
	case r.ShareKey != "":
		return v1alpha1.AnnotationShareKey
	}
	return "status.loadBalancer.ingress"
}
