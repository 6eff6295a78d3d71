package annotations

import (
	"errors"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/keeplb/keeplb/pkg/allocator"
)

// FuzzParse feeds Parse arbitrary annotation values and
// spec.loadBalancerIP. Whatever it accepts is safe to hand the allocator:
// addresses without zones, never IPv4-mapped, at most one per family, from
// the source it names; whatever it refuses is an InvalidAnnotation naming
// a field.
func FuzzParse(f *testing.F) {
	f.Add(uint8(0xff), "edge", "192.0.2.10, 2001:db8::10", "web", "pod", "192.0.2.10", "pools")
	f.Add(uint8(0x02), "", "192.0.2.1,", "", "", "", "")
	f.Add(uint8(0x02), "", "::ffff:192.0.2.1", "", "", "::ffff:192.0.2.1", "")
	f.Add(uint8(0x00), "", "", "", "", "2001:db8::5%eth0", "")
	f.Add(uint8(0x02), "", "2001:db8::1%eth0", "", "", "", "")
	f.Add(uint8(0x02), "", " , ", "", "", "", "")
	f.Add(uint8(0x0c), "", "", "-web-", "dsr", "nope", "schedular")
	f.Fuzz(func(t *testing.T, set uint8, pool, ips, shareKey, forwarding, lbIP, extra string) {
		ann := map[string]string{}
		for i, kv := range [][2]string{{Pool, pool}, {IPs, ips}, {ShareKey, shareKey}, {Forwarding, forwarding}, {Prefix + extra, "x"}} {
			if set&(1<<i) != 0 {
				ann[kv[0]] = kv[1]
			}
		}
		svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: ann}, Spec: v1.ServiceSpec{LoadBalancerIP: lbIP}}
		c, err := Parse(svc)
		if err != nil {
			var e *allocator.Error
			if !errors.As(err, &e) || e.Reason != allocator.ReasonInvalid || e.Msg == "" ||
				!slices.Contains([]string{Pool, IPs, ShareKey, Forwarding, LoadBalancerIPField}, e.Field) {
				t.Fatalf("Parse error = %#v, want an InvalidAnnotation naming a field", err)
			}
			return
		}
		seen := map[allocator.Family]bool{}
		for _, a := range c.IPs {
			if !a.IsValid() || a.Zone() != "" || a.Is4In6() || seen[allocator.FamilyOf(a)] {
				t.Fatalf("Parse accepted IPs %v", c.IPs)
			}
			seen[allocator.FamilyOf(a)] = true
		}
		_, hasIPs := ann[IPs]
		switch {
		case hasIPs && (c.IPsSource != IPs || len(c.IPs) == 0):
			t.Fatalf("keeplb.io/ips %q gave %v from %q", ips, c.IPs, c.IPsSource)
		case !hasIPs && strings.TrimSpace(lbIP) != "" && (c.IPsSource != LoadBalancerIPField || len(c.IPs) != 1):
			t.Fatalf("spec.loadBalancerIP %q gave %v from %q", lbIP, c.IPs, c.IPsSource)
		case !hasIPs && strings.TrimSpace(lbIP) == "" && len(c.IPs) != 0:
			t.Fatalf("no address asked for, got %v", c.IPs)
		}
		if _, ok := ann[Pool]; ok && len(validation.IsDNS1123Subdomain(c.Pool)) > 0 {
			t.Fatalf("accepted pool %q", c.Pool)
		}
		if _, ok := ann[ShareKey]; ok && (c.ShareKey == "" || len(validation.IsValidLabelValue(c.ShareKey)) > 0) {
			t.Fatalf("accepted share key %q", c.ShareKey)
		}
		if _, ok := ann[Forwarding]; ok && !c.Forwarding.Valid() {
			t.Fatalf("accepted forwarding %q", c.Forwarding)
		}
		if k := Prefix + extra; set&(1<<4) != 0 && !slices.Contains(known, k) &&
			!slices.ContainsFunc(c.Warnings, func(w string) bool { return strings.Contains(w, k) }) {
			t.Fatalf("unknown annotation %s not warned about: %v", k, c.Warnings)
		}
	})
}
