package annotations

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name     string
		ann      map[string]string
		lbIP     string
		want     Config
		errField string
		errText  string
	}{
		{name: "none"},
		{name: "pool", ann: map[string]string{Pool: "edge"}, want: Config{Pool: "edge"}},
		{name: "bad pool", ann: map[string]string{Pool: "Edge_1"}, errField: Pool, errText: "not an IPPool name"},
		{name: "ips dual", ann: map[string]string{IPs: "192.0.2.10, 2001:db8::10"}, want: Config{IPs: addrs("192.0.2.10", "2001:db8::10"), IPsSource: IPs}},
		{name: "ips mapped v4", ann: map[string]string{IPs: "::ffff:192.0.2.1"}, want: Config{IPs: addrs("192.0.2.1"), IPsSource: IPs}},
		{name: "bad ip", ann: map[string]string{IPs: "192.0.2.300"}, errField: IPs, errText: `"192.0.2.300" is not an IP address`},
		{name: "two v4", ann: map[string]string{IPs: "192.0.2.1,192.0.2.2"}, errField: IPs, errText: "two IPv4 addresses"},
		{name: "empty ips", ann: map[string]string{IPs: " , "}, errField: IPs, errText: "is empty"},
		{name: "blank ips", ann: map[string]string{IPs: ""}, errField: IPs, errText: "is empty"},
		// Regression: an empty entry was skipped, so "192.0.2.1," (an
		// edit that lost its second address) passed silently.
		{name: "trailing comma", ann: map[string]string{IPs: "192.0.2.1,"}, errField: IPs, errText: `"192.0.2.1," has an empty entry`},
		{name: "leading comma", ann: map[string]string{IPs: ",192.0.2.1"}, errField: IPs, errText: "has an empty entry"},
		{name: "double comma", ann: map[string]string{IPs: "192.0.2.1,,2001:db8::1"}, errField: IPs, errText: "has an empty entry"},
		{name: "zoned ip", ann: map[string]string{IPs: "2001:db8::1%eth0"}, errField: IPs, errText: `"2001:db8::1%eth0" has a zone; a LoadBalancer address belongs to no one link, so write 2001:db8::1`},
		{name: "loadBalancerIP", lbIP: "192.0.2.7", want: Config{IPs: addrs("192.0.2.7"), IPsSource: LoadBalancerIPField}},
		{name: "bad loadBalancerIP", lbIP: "nope", errField: LoadBalancerIPField, errText: "not an IP address"},
		{name: "mapped loadBalancerIP", lbIP: "::ffff:192.0.2.7", want: Config{IPs: addrs("192.0.2.7"), IPsSource: LoadBalancerIPField}},
		{name: "mapped ips agree with loadBalancerIP", ann: map[string]string{IPs: "::ffff:192.0.2.7"}, lbIP: "192.0.2.7", want: Config{IPs: addrs("192.0.2.7"), IPsSource: IPs}},
		// Regression: the API server only warns about a zoned
		// spec.loadBalancerIP, and keeplb took the address with its zone.
		{name: "zoned loadBalancerIP", lbIP: "2001:db8::5%eth0", errField: LoadBalancerIPField, errText: `"2001:db8::5%eth0" has a zone; a LoadBalancer address belongs to no one link, so write 2001:db8::5`},
		{name: "zoned loadBalancerIP with ips", ann: map[string]string{IPs: "2001:db8::5"}, lbIP: "2001:db8::5%eth0", errField: LoadBalancerIPField, errText: "has a zone"},
		{name: "ips agree with loadBalancerIP", ann: map[string]string{IPs: "192.0.2.7"}, lbIP: "192.0.2.7", want: Config{IPs: addrs("192.0.2.7"), IPsSource: IPs}},
		{name: "ips disagree with loadBalancerIP", ann: map[string]string{IPs: "192.0.2.8"}, lbIP: "192.0.2.7", errField: IPs, errText: "disagrees with spec.loadBalancerIP"},
		{name: "share key", ann: map[string]string{ShareKey: "web"}, want: Config{ShareKey: "web"}},
		{name: "bad share key", ann: map[string]string{ShareKey: "-web-"}, errField: ShareKey, errText: "not a valid key"},
		{name: "forwarding", ann: map[string]string{Forwarding: "pod"}, want: Config{Forwarding: "pod"}},
		{name: "bad forwarding", ann: map[string]string{Forwarding: "dsr"}, errField: Forwarding, errText: "use nodeport, pod or kube-proxy"},
		// Regression: the hint listed only the first four annotations,
		// leaving out keeplb.io/scheduler, which the speaker reads.
		{name: "typo warns", ann: map[string]string{"keeplb.io/schedular": "x"}, want: Config{Warnings: []string{"unknown annotation keeplb.io/schedular is ignored; keeplb reads keeplb.io/pool, keeplb.io/ips, keeplb.io/share-key, keeplb.io/forwarding, keeplb.io/scheduler"}}},
		{name: "others ignored", ann: map[string]string{"example.com/x": "y", Holder: "node-1", Scheduler: "wrr"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann}, Spec: v1.ServiceSpec{LoadBalancerIP: tc.lbIP}}
			got, err := Parse(svc)
			if tc.errField != "" {
				var e *allocator.Error
				if !errors.As(err, &e) || e.Field != tc.errField || e.Reason != allocator.ReasonInvalid || !strings.Contains(e.Msg, tc.errText) {
					t.Fatalf("Parse error = %v, want %s: ...%s...", err, tc.errField, tc.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Pool != tc.want.Pool || !slices.Equal(got.IPs, tc.want.IPs) || got.IPsSource != tc.want.IPsSource ||
				got.ShareKey != tc.want.ShareKey || got.Forwarding != tc.want.Forwarding || !slices.Equal(got.Warnings, tc.want.Warnings) {
				t.Fatalf("Parse = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func TestHandles(t *testing.T) {
	ours, other := "keeplb.io/vip", "example.com/lb"
	lb := func(class *string) *v1.Service {
		return &v1.Service{Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, LoadBalancerClass: class}}
	}
	for _, tc := range []struct {
		name         string
		svc          *v1.Service
		defaultClass bool
		want         bool
	}{
		{"our class", lb(&ours), false, true},
		{"no class, default on", lb(nil), true, true},
		{"no class, default off", lb(nil), false, false},
		{"other class", lb(&other), true, false},
		{"not a LoadBalancer", &v1.Service{Spec: v1.ServiceSpec{Type: v1.ServiceTypeClusterIP}}, true, false},
	} {
		if got := Handles(tc.svc, ours, tc.defaultClass); got != tc.want {
			t.Errorf("%s: Handles = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestForwardingOf(t *testing.T) {
	pod := &v1alpha1.IPPool{Spec: v1alpha1.IPPoolSpec{Forwarding: v1alpha1.ForwardingPod}}
	for _, c := range []struct {
		ann     map[string]string
		pool    *v1alpha1.IPPool
		want    v1alpha1.Forwarding
		wantErr bool
	}{
		{nil, nil, v1alpha1.ForwardingNodePort, false},
		{nil, pod, v1alpha1.ForwardingPod, false},
		{map[string]string{Forwarding: " kube-proxy "}, pod, v1alpha1.ForwardingKubeProxy, false},
		{map[string]string{Forwarding: "dsr"}, pod, v1alpha1.ForwardingPod, true},
		{map[string]string{Forwarding: ""}, nil, v1alpha1.ForwardingNodePort, true},
	} {
		svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: c.ann}}
		got, err := ForwardingOf(svc, c.pool)
		if got != c.want || (err != nil) != c.wantErr {
			t.Errorf("ForwardingOf(%v) = %q, %v; want %q, error %v", c.ann, got, err, c.want, c.wantErr)
		}
		// Parse refuses what ForwardingOf falls back from.
		if _, perr := Parse(svc); (perr != nil) != c.wantErr {
			t.Errorf("Parse(%v) error %v; want error %v", c.ann, perr, c.wantErr)
		}
	}
}

func TestSchedulerOf(t *testing.T) {
	for ann, want := range map[string]string{"": DefaultScheduler, " wlc ": "wlc", "fastest": DefaultScheduler} {
		svc := &v1.Service{}
		if ann != "" {
			svc.Annotations = map[string]string{Scheduler: ann}
		}
		got, err := SchedulerOf(svc)
		if got != want || (err != nil) != (ann == "fastest") {
			t.Errorf("SchedulerOf(%q) = %q, %v; want %q", ann, got, err, want)
		}
	}
}

func TestValidateClass(t *testing.T) {
	for class, ok := range map[string]bool{DefaultClass: true, "example.com/lb": true, "vip": false, "a/b/c": false, "": false} {
		if err := ValidateClass("--load-balancer-class", class); (err == nil) != ok {
			t.Errorf("ValidateClass(%q) = %v; want ok %v", class, err, ok)
		}
	}
}
