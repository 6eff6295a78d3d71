package nodeview

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

func TestAddress(t *testing.T) {
	for _, tc := range []struct {
		in, want, reason string
	}{
		{"10.0.0.1", "10.0.0.1", ""},
		{"192.0.2.7", "192.0.2.7", ""},
		{"2001:db8::1", "2001:db8::1", ""},
		{"fd00::1", "fd00::1", ""},
		{"::ffff:10.0.0.1", "10.0.0.1", ""},
		{"fe80::1%eth0", "", "zone"},
		{"2001:db8::1%eth0", "", "zone"},
		{"10.0.0.1 } ; flush ruleset", "", "not an IP address"},
		{"", "", "not an IP address"},
		{"node-1.example.com", "", "not an IP address"},
		{"fe80::1", "", "link-local"},
		{"169.254.1.1", "", "link-local"},
		{"127.0.0.1", "", "loopback"},
		{"::1", "", "loopback"},
		{"::ffff:127.0.0.1", "", "loopback"},
		{"0.0.0.0", "", "unspecified"},
		{"::", "", "unspecified"},
		{"224.0.0.18", "", "multicast"},
		{"ff02::12", "", "multicast"},
		{"255.255.255.255", "", "not a unicast address"},
	} {
		got, reason := Address(tc.in)
		if tc.reason == "" {
			if reason != "" || got != netip.MustParseAddr(tc.want) {
				t.Errorf("Address(%q) = %v, %q; want %s", tc.in, got, reason, tc.want)
			}
			continue
		}
		if got.IsValid() || !strings.Contains(reason, tc.reason) {
			t.Errorf("Address(%q) = %v, %q; want no address and a reason containing %q", tc.in, got, reason, tc.reason)
		}
	}
}

func TestOf(t *testing.T) {
	n := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{"zone": "a"}},
		Status: v1.NodeStatus{
			Conditions: []v1.NodeCondition{{Type: v1.NodeMemoryPressure, Status: v1.ConditionFalse}, {Type: v1.NodeReady, Status: v1.ConditionTrue}},
			Addresses: []v1.NodeAddress{
				{Type: v1.NodeHostName, Address: "n1"},
				{Type: v1.NodeInternalIP, Address: "fe80::1%eth0"},
				{Type: v1.NodeInternalIP, Address: "10.0.0.1"},
				{Type: v1.NodeExternalIP, Address: "fe80::2"}, // not used, so not reported
				{Type: v1.NodeInternalIP, Address: "2001:db8::1%eth0"},
				{Type: v1.NodeInternalIP, Address: "10.0.0.1 } ; flush ruleset"},
				{Type: v1.NodeInternalIP, Address: "::ffff:10.0.0.9"},
				{Type: v1.NodeInternalIP, Address: "fd00::1"},
			},
		},
	}
	got, ignored := Of(n)
	want := vrrp.Node{Name: "n1", Labels: map[string]string{"zone": "a"}, Ready: true,
		InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("fd00::1")}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Of = %+v\nwant %+v", got, want)
	}
	var fields []string
	for _, i := range ignored {
		fields = append(fields, i.Field)
	}
	if want := []string{"status.addresses[1]", "status.addresses[4]", "status.addresses[5]"}; !reflect.DeepEqual(fields, want) {
		t.Errorf("ignored %v, want %v", ignored, want)
	}
	if s := ignored[0].String(); !strings.Contains(s, `status.addresses[1] "fe80::1%eth0"`) || !strings.Contains(s, "zone (%eth0)") {
		t.Errorf("Ignored.String() = %q", s)
	}
	if got.InternalIP(allocator.IPv4) != netip.MustParseAddr("10.0.0.1") || got.InternalIP(allocator.IPv6) != netip.MustParseAddr("fd00::1") {
		t.Errorf("InternalIP: IPv4 %v, IPv6 %v", got.InternalIP(allocator.IPv4), got.InternalIP(allocator.IPv6))
	}

	for _, conds := range [][]v1.NodeCondition{nil, {{Type: v1.NodeReady, Status: v1.ConditionFalse}}, {{Type: v1.NodeReady, Status: v1.ConditionUnknown}}} {
		n.Status.Conditions = conds
		if got, _ := Of(n); got.Ready {
			t.Errorf("conditions %v: Ready", conds)
		}
	}
}

// TestSame: the updates a kubelet makes all the time (heartbeats, images,
// resourceVersion) are not changes; any field of the view, or an ignored
// address, is.
func TestSame(t *testing.T) {
	base := func() *v1.Node {
		return &v1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "1", Labels: map[string]string{"zone": "a"}},
			Status: v1.NodeStatus{
				Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Unix(100, 0)}},
				Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "10.0.0.1"}, {Type: v1.NodeHostName, Address: "n1"}},
			},
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*v1.Node)
		same   bool
	}{
		{"heartbeat and resourceVersion", func(n *v1.Node) {
			n.ResourceVersion = "2"
			n.Status.Conditions[0].LastHeartbeatTime = metav1.Unix(200, 0)
		}, true},
		{"images", func(n *v1.Node) { n.Status.Images = []v1.ContainerImage{{Names: []string{"x"}}} }, true},
		{"hostname", func(n *v1.Node) { n.Status.Addresses[1].Address = "other" }, true},
		{"Ready", func(n *v1.Node) { n.Status.Conditions[0].Status = v1.ConditionUnknown }, false},
		{"a label", func(n *v1.Node) { n.Labels["zone"] = "b" }, false},
		{"the exclusion label", func(n *v1.Node) { n.Labels["node.kubernetes.io/exclude-from-external-load-balancers"] = "" }, false},
		{"InternalIP", func(n *v1.Node) { n.Status.Addresses[0].Address = "10.0.0.2" }, false},
		{"an ignored InternalIP added", func(n *v1.Node) {
			n.Status.Addresses = append(n.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "fe80::1%eth0"})
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := base()
			tc.change(n)
			if got := Same(base(), n); got != tc.same {
				t.Errorf("Same = %v, want %v", got, tc.same)
			}
		})
	}
}
