package speaker

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"sort"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// Inputs is what the speaker reads from the API, from its informer caches.
type Inputs struct {
	Services []*v1.Service
	Slices   []*discoveryv1.EndpointSlice
	Nodes    []*v1.Node
	Pools    []*v1alpha1.IPPool
	// Class and DefaultClass decide which Services are keeplb's, by the
	// same rule as the controller.
	Class        string
	DefaultClass bool
}

// defaultSlice is how many VRIDs a pool that keeps the default range gets.
const defaultSlice = 32

// PlanInput turns the API state into the VRRP plan's input, and maps each
// VIP to the Services that use it. Services that are not keeplb's, and
// addresses in no pool, are left out: the speaker never touches them.
//
// Pools that keep the default VRID range (1-255, or none) share it: in
// creation order each gets the next slice of 32 VRIDs that no pool with an
// explicit range claims, so that two such pools never collide. Set
// spec.vrrp.virtualRouterIDs to pin a pool's VRIDs.
func PlanInput(in Inputs) (vrrp.Input, map[netip.Addr][]string) {
	parsed := pools.Parse(in.Pools)
	var out vrrp.Input
	explicit := make([]bool, 256)
	shared := map[string]bool{}
	for _, p := range in.Pools {
		first, last, err := 1, 255, error(nil)
		if v := p.Spec.VRRP; v != nil {
			first, last, err = vrrp.ParseVRIDRange(v.VirtualRouterIDs)
		}
		if err != nil || first == 1 && last == 255 {
			shared[p.Name] = true
			continue
		}
		for id := first; id <= last; id++ {
			explicit[id] = true
		}
	}
	// Each pool sharing the default range gets the next contiguous run of
	// free VRIDs, at most defaultSlice long; runs shorter than 4 between
	// pinned ranges are skipped.
	next := 1
	slice := func() (int, int) {
		for next <= 255 {
			for next <= 255 && explicit[next] {
				next++
			}
			first := next
			for next <= 255 && !explicit[next] && next-first < defaultSlice {
				next++
			}
			if next-first >= 4 || next > 255 && next > first {
				return first, next - 1
			}
		}
		return 0, 0 // out of VRIDs: the plan reports the pool
	}
	for i, p := range parsed {
		ip := in.Pools[indexOf(in.Pools, p.Pool.Name)]
		vp := vrrp.Pool{Name: p.Pool.Name, FirstVRID: 1, LastVRID: 255, Order: i}
		if shared[vp.Name] {
			vp.FirstVRID, vp.LastVRID = slice()
		}
		if v := ip.Spec.VRRP; v != nil {
			if !shared[vp.Name] {
				vp.FirstVRID, vp.LastVRID, _ = vrrp.ParseVRIDRange(v.VirtualRouterIDs)
			}
			if v.AdvertisementInterval != nil {
				vp.Advert = v.AdvertisementInterval.Duration
			}
			vp.Unicast, vp.Interface = v.Unicast, v.Interface
			if v.NodeSelector != nil {
				sel, err := metav1.LabelSelectorAsSelector(v.NodeSelector)
				if err != nil {
					sel = labels.Nothing() // an invalid selector admits no node rather than all
				}
				vp.NodeSelector = sel
			}
		}
		out.Pools = append(out.Pools, vp)
	}
	for _, n := range in.Nodes {
		out.Nodes = append(out.Nodes, nodeOf(n))
	}
	local := localNodes(in.Slices)
	owners := map[netip.Addr][]string{}
	for _, svc := range in.Services {
		if !annotations.Handles(svc, in.Class, in.DefaultClass) {
			continue
		}
		key := svc.Namespace + "/" + svc.Name
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			a, err := netip.ParseAddr(ing.IP)
			if err != nil {
				continue
			}
			a = a.Unmap()
			pool := pools.Find(parsed, a)
			if pool == "" {
				continue
			}
			v := vrrp.VIP{Addr: a, Pool: pool, Service: key, Created: svc.CreationTimestamp.Time}
			if svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal {
				v.Local, v.LocalNodes = true, local[key]
			}
			out.VIPs = append(out.VIPs, v)
			owners[a] = append(owners[a], key)
		}
	}
	for _, keys := range owners {
		sort.Strings(keys)
	}
	return out, owners
}

func indexOf(ps []*v1alpha1.IPPool, name string) int {
	for i, p := range ps {
		if p.Name == name {
			return i
		}
	}
	return -1
}

func nodeOf(n *v1.Node) vrrp.Node {
	vn := vrrp.Node{Name: n.Name, Labels: n.Labels}
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeReady {
			vn.Ready = c.Status == v1.ConditionTrue
		}
	}
	for _, a := range n.Status.Addresses {
		if a.Type != v1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			vn.InternalIPs = append(vn.InternalIPs, ip.Unmap())
		}
	}
	return vn
}

// localNodes returns, per Service key, the nodes with a ready endpoint.
func localNodes(slices []*discoveryv1.EndpointSlice) map[string][]string {
	set := map[string]map[string]bool{}
	for _, s := range slices {
		svc := s.Labels[discoveryv1.LabelServiceName]
		if svc == "" {
			continue
		}
		key := s.Namespace + "/" + svc
		for _, ep := range s.Endpoints {
			if ep.NodeName == nil || (ep.Conditions.Ready != nil && !*ep.Conditions.Ready) {
				continue
			}
			if set[key] == nil {
				set[key] = map[string]bool{}
			}
			set[key][*ep.NodeName] = true
		}
	}
	out := make(map[string][]string, len(set))
	for key, nodes := range set {
		for n := range nodes {
			out[key] = append(out[key], n)
		}
		sort.Strings(out[key])
	}
	return out
}

// Layout says where the speaker keeps keepalived's files.
type Layout struct {
	// RunDir holds keepalived.conf, the notify FIFO and the track files.
	RunDir string
}

// ConfigPath is keepalived's configuration file.
func (l Layout) ConfigPath() string { return filepath.Join(l.RunDir, "keepalived.conf") }

// FIFOPath is keepalived's notify FIFO.
func (l Layout) FIFOPath() string { return filepath.Join(l.RunDir, "notify.fifo") }

// TrackPath is the track file of a Local instance.
func (l Layout) TrackPath(instance string) string {
	return filepath.Join(l.RunDir, "track", instance)
}

// KeepalivedConfig renders this node's share of the plan as keepalived
// configuration: the instances it takes part in, on the interfaces that
// carry their VIPs here. Instances that cannot be placed are left out and
// reported; the others are unaffected.
func KeepalivedConfig(plan vrrp.Plan, node string, nodes []vrrp.Node, links []hostnet.Link, l Layout) (keepalived.Config, []error) {
	ifaces := make([]vrrp.Interface, len(links))
	for i, ln := range links {
		ifaces[i] = vrrp.Interface{Name: ln.Name, Prefixes: ln.Prefixes, DefaultRoute4: ln.DefaultRoute4, DefaultRoute6: ln.DefaultRoute6}
	}
	cfg := keepalived.Config{RouterID: node, NotifyFIFO: l.FIFOPath()}
	var errs []error
	for _, inst := range plan.For(node) {
		pl, err := vrrp.Place(inst, ifaces)
		if err != nil {
			errs = append(errs, fmt.Errorf("instance %s: %w", inst.Name, err))
		}
		if pl.Interface == "" {
			continue
		}
		ki := keepalived.Instance{
			Name:           inst.Name,
			Interface:      pl.Interface,
			VRID:           inst.VRID,
			Priority:       inst.Priorities[node],
			AdvertInterval: inst.Advert,
			Version:        inst.Version,
			IPv6:           inst.Family == allocator.IPv6,
			PreemptDelay:   inst.PreemptDelay,
		}
		for i, v := range inst.VIPs {
			if pl.Devs[i] != "" {
				ki.VIPs = append(ki.VIPs, netip.PrefixFrom(v, v.BitLen()))
			}
		}
		if inst.Unicast {
			src, peers := vrrp.UnicastPeers(inst, node, nodes)
			if !src.IsValid() {
				errs = append(errs, fmt.Errorf("instance %s: unicast needs an %s InternalIP on node %s", inst.Name, inst.Family, node))
				continue
			}
			if len(peers) > 0 { // alone, a node has nobody to advertise to
				ki.UnicastSrc, ki.UnicastPeers = src, peers
			}
		}
		if inst.TrackFile {
			cfg.TrackFiles = append(cfg.TrackFiles, keepalived.TrackFile{Name: inst.Name, Path: l.TrackPath(inst.Name)})
			ki.TrackFile, ki.TrackWeight = inst.Name, 1
		}
		cfg.Instances = append(cfg.Instances, ki)
	}
	return cfg, errs
}
