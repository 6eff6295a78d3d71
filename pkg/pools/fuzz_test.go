package pools

import (
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// FuzzParse feeds two pools arbitrary spec.addresses (entries separated by
// newlines). Every entry becomes a range or a problem, never both or
// neither; every range is one the allocator can trust; Find attributes
// each range's bounds to a pool; and Status, from the allocator's counts,
// reports the problems and counts that add up.
func FuzzParse(f *testing.F) {
	f.Add("192.0.2.0/28\n2001:db8::/124", "192.0.2.8/29", true)
	f.Add("::/80\nfe80::/64%eth0\n::ffff:192.0.2.0/120", "2001:db8::10-2001:db8::1", false)
	f.Add("0.0.0.0/0", "10.0.0.0/8", true)
	f.Add("junk\n\n192.0.2.1", "-", false)
	f.Fuzz(func(t *testing.T, first, second string, avoidBuggy bool) {
		older := ippool("older", 1, strings.Split(first, "\n")...)
		newer := ippool("newer", 2, strings.Split(second, "\n")...)
		newer.Spec.AvoidBuggyIPs = avoidBuggy
		parsed := Parse([]*v1alpha1.IPPool{newer, older})
		var aps []allocator.Pool
		for i, ip := range []*v1alpha1.IPPool{older, newer} {
			p := parsed[i]
			if p.Pool.Name != ip.Name {
				t.Fatalf("parsed[%d] = %s, want %s (creation order)", i, p.Pool.Name, ip.Name)
			}
			if len(p.Pool.Ranges)+len(p.Problems) != len(ip.Spec.Addresses) {
				t.Fatalf("%s: %d entries gave %d ranges and %d problems", ip.Name, len(ip.Spec.Addresses), len(p.Pool.Ranges), len(p.Problems))
			}
			for _, r := range p.Pool.Ranges {
				if r.First.Zone() != "" || r.Last.Zone() != "" || r.First.Is4In6() || r.Last.Is4In6() || r.First.Is4() != r.Last.Is4() || r.Last.Less(r.First) {
					t.Fatalf("%s: range %v is zoned, mapped, mixed or inverted", ip.Name, r)
				}
				want := ip.Name
				if slices.ContainsFunc(parsed[0].Pool.Ranges, func(o allocator.Range) bool { return o.Contains(r.First) }) {
					want = "older"
				}
				if got := Find(parsed, r.First); got != want {
					t.Fatalf("Find(%s) = %q, want %q: the older pool wins where they overlap", r.First, got, want)
				}
			}
			aps = append(aps, p.Pool)
		}
		a := allocator.New()
		a.SetPools(aps)
		stats := a.Stats()
		for i, ip := range []*v1alpha1.IPPool{older, newer} {
			st := Status(ip, parsed[i], stats[ip.Name], metav1.NewTime(time.Unix(1, 0)))
			total, ok1 := new(big.Int).SetString(st.Total, 10)
			free, ok2 := new(big.Int).SetString(st.Free, 10)
			if !ok1 || !ok2 || total.Cmp(free) != 0 || st.Used != 0 {
				t.Fatalf("%s: status counts %q free %q used %d; with no Service every address is free", ip.Name, st.Total, st.Free, st.Used)
			}
			ready := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionReady)
			if (ready.Reason == ReasonInvalidAddresses) != (len(parsed[i].Problems) > 0) {
				t.Fatalf("%s: Ready %s with problems %v", ip.Name, ready.Reason, parsed[i].Problems)
			}
		}
	})
}
