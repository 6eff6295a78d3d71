package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
)

// manifestPath returns the absolute path of a file or directory under the
// repository's manifests/ directory; kubectl may run in another directory.
func manifestPath(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "manifests", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// newPool builds an unstructured IPPool with the given spec, so that tests
// can send values the Go types would never produce.
func newPool(name string, spec map[string]any) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
	u.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
	u.SetKind(v1alpha1.IPPoolKind)
	u.SetName(name)
	return u
}

func TestIPPoolAdmission(t *testing.T) {
	cp := controlplane.StartForTest(t)
	ctx := t.Context()
	if err := cp.Apply(ctx, manifestPath(t, "crd/ippools.keeplb.io.yaml")); err != nil {
		t.Fatalf("installing the IPPool CRD: %v", err)
	}
	dyn, err := dynamic.NewForConfig(cp.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	pools := dyn.Resource(v1alpha1.IPPoolResource)

	t.Run("valid", func(t *testing.T) {
		for i, tc := range []struct {
			name  string
			spec  map[string]any
			check func(t *testing.T, p *v1alpha1.IPPool)
		}{{
			name: "ipv4 cidr",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}},
			check: func(t *testing.T, p *v1alpha1.IPPool) {
				// Top-level defaults; no vrrp block appears by itself.
				if p.Spec.AutoAssign == nil || !*p.Spec.AutoAssign {
					t.Errorf("autoAssign = %v, want defaulted to true", p.Spec.AutoAssign)
				}
				if p.Spec.Forwarding != v1alpha1.ForwardingNodePort {
					t.Errorf("forwarding = %q, want defaulted to nodeport", p.Spec.Forwarding)
				}
				if p.Spec.AvoidBuggyIPs {
					t.Error("avoidBuggyIPs defaulted to true")
				}
				if p.Spec.ICMPEcho != v1alpha1.ICMPEchoAllow {
					t.Errorf("icmpEcho = %q, want defaulted to Allow", p.Spec.ICMPEcho)
				}
				if n := p.Spec.NodePortSubsetSize; n == nil || *n != v1alpha1.DefaultNodePortSubsetSize {
					t.Errorf("nodePortSubsetSize = %v, want defaulted to %d", n, v1alpha1.DefaultNodePortSubsetSize)
				}
				if p.Spec.VRRP != nil {
					t.Errorf("vrrp = %+v, want absent", p.Spec.VRRP)
				}
			},
		}, {
			name: "ipv6 cidr",
			spec: map[string]any{"addresses": []any{"2001:db8::/120"}},
		}, {
			name: "single addresses",
			spec: map[string]any{"addresses": []any{"192.0.2.7/32", "2001:db8::7/128"}},
		}, {
			name: "ipv4 range",
			spec: map[string]any{"addresses": []any{"192.0.2.10-192.0.2.20"}},
		}, {
			name: "ipv4 range across octets",
			spec: map[string]any{"addresses": []any{"192.0.2.250-192.0.3.5", "9.255.255.255-10.0.0.0"}},
		}, {
			name: "ipv4 one-address range",
			spec: map[string]any{"addresses": []any{"192.0.2.10-192.0.2.10"}},
		}, {
			name: "ipv6 range",
			spec: map[string]any{"addresses": []any{"2001:db8::10-2001:db8::20"}},
		}, {
			name: "mixed",
			spec: map[string]any{"addresses": []any{
				"192.0.2.0/28", "198.51.100.1-198.51.100.9", "2001:db8::/124", "2001:db8:1::1-2001:db8:1::ff",
			}},
		}, {
			name: "vrrp defaults",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": map[string]any{}},
			check: func(t *testing.T, p *v1alpha1.IPPool) {
				v := p.Spec.VRRP
				if v == nil {
					t.Fatal("vrrp vanished")
				}
				if v.VirtualRouterIDs != "1-255" {
					t.Errorf("virtualRouterIDs = %q, want defaulted to 1-255", v.VirtualRouterIDs)
				}
				if v.AdvertisementInterval == nil || v.AdvertisementInterval.Duration != time.Second {
					t.Errorf("advertisementInterval = %v, want defaulted to 1s", v.AdvertisementInterval)
				}
				if v.Failback != v1alpha1.FailbackDelayed || v.FailbackDelay != nil {
					t.Errorf("failback = %q, delay %v; want defaulted to Delayed, the delay unset (60s)", v.Failback, v.FailbackDelay)
				}
			},
		}, {
			name: "vrrp bounds",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": map[string]any{
				"virtualRouterIDs": "255", "advertisementInterval": "10ms", "failbackDelay": "0s",
			}},
		}, {
			name: "vrrp upper bounds",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": map[string]any{
				"virtualRouterIDs": "1-255", "advertisementInterval": "40s", "interface": "enp129s0f1.4094",
				"failback": "Delayed", "failbackDelay": "1000s",
			}},
		}, {
			name: "failback never",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": map[string]any{"failback": "Never"}},
			check: func(t *testing.T, p *v1alpha1.IPPool) {
				if v := p.Spec.VRRP; v.Failback != v1alpha1.FailbackNever || v.FailbackDelay != nil {
					t.Errorf("failback = %q, delay %v; want Never without a delay", v.Failback, v.FailbackDelay)
				}
			},
		}, {
			name: "failback immediate",
			spec: map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": map[string]any{"failback": "Immediate"}},
		}, {
			name: "every optional field",
			spec: map[string]any{
				"addresses":     []any{"192.0.2.0/28", "2001:db8::10-2001:db8::20"},
				"autoAssign":    false,
				"avoidBuggyIPs": true,
				"serviceAllocation": map[string]any{
					"priority":   int64(-5),
					"namespaces": []any{"web", "kube-system"},
					"namespaceSelector": map[string]any{
						"matchLabels": map[string]any{"keeplb.io/public": "true"},
					},
					"serviceSelector": map[string]any{
						"matchExpressions": []any{
							map[string]any{"key": "tier", "operator": "In", "values": []any{"edge", "web"}},
							map[string]any{"key": "internal", "operator": "DoesNotExist"},
						},
					},
				},
				"forwarding":         "kube-proxy",
				"icmpEcho":           "Drop",
				"nodePortSubsetSize": int64(0),
				"vrrp": map[string]any{
					"interface":             "bond0.100",
					"virtualRouterIDs":      "10-20",
					"advertisementInterval": "1.5s",
					"unicast":               true,
					"failback":              "Delayed",
					"failbackDelay":         "2.5s",
					"nodeSelector": map[string]any{
						"matchLabels": map[string]any{"node-role.example.com/edge": ""},
						"matchExpressions": []any{
							map[string]any{"key": "zone", "operator": "NotIn", "values": []any{"a"}},
							map[string]any{"key": "edge", "operator": "Exists"},
						},
					},
				},
			},
			check: func(t *testing.T, p *v1alpha1.IPPool) {
				f := false
				want := v1alpha1.IPPoolSpec{
					Addresses:     []string{"192.0.2.0/28", "2001:db8::10-2001:db8::20"},
					AutoAssign:    &f,
					AvoidBuggyIPs: true,
					ServiceAllocation: &v1alpha1.ServiceAllocation{
						Priority:          -5,
						Namespaces:        []string{"web", "kube-system"},
						NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"keeplb.io/public": "true"}},
						ServiceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
							{Key: "tier", Operator: metav1.LabelSelectorOpIn, Values: []string{"edge", "web"}},
							{Key: "internal", Operator: metav1.LabelSelectorOpDoesNotExist},
						}},
					},
					Forwarding:         v1alpha1.ForwardingKubeProxy,
					ICMPEcho:           v1alpha1.ICMPEchoDrop,
					NodePortSubsetSize: ptr.To[int32](0),
					VRRP: &v1alpha1.VRRP{
						Interface:             "bond0.100",
						VirtualRouterIDs:      "10-20",
						AdvertisementInterval: &metav1.Duration{Duration: 1500 * time.Millisecond},
						Unicast:               true,
						Failback:              v1alpha1.FailbackDelayed,
						FailbackDelay:         &metav1.Duration{Duration: 2500 * time.Millisecond},
						NodeSelector: &metav1.LabelSelector{
							MatchLabels: map[string]string{"node-role.example.com/edge": ""},
							MatchExpressions: []metav1.LabelSelectorRequirement{
								{Key: "zone", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"a"}},
								{Key: "edge", Operator: metav1.LabelSelectorOpExists},
							},
						},
					},
				}
				if !reflect.DeepEqual(p.Spec, want) {
					t.Errorf("spec read back as\n%#v\nwant\n%#v", p.Spec, want)
				}
			},
		}} {
			t.Run(tc.name, func(t *testing.T) {
				name := fmt.Sprintf("valid-%d", i)
				created, err := pools.Create(ctx, newPool(name, tc.spec), metav1.CreateOptions{})
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				t.Cleanup(func() {
					if err := pools.Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
						t.Errorf("delete %s: %v", name, err)
					}
				})
				got, err := pools.Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got.Object["spec"], created.Object["spec"]) {
					t.Errorf("spec of the create response %v differs from the stored one %v", created.Object["spec"], got.Object["spec"])
				}
				p, err := v1alpha1.FromUnstructured(got)
				if err != nil {
					t.Fatalf("stored object does not decode into the Go types: %v", err)
				}
				if tc.check != nil {
					tc.check(t, p)
				}
			})
		}
	})

	t.Run("invalid", func(t *testing.T) {
		tooMany := make([]any, 65)
		for i := range tooMany {
			tooMany[i] = fmt.Sprintf("192.0.2.%d/32", i)
		}
		for i, tc := range []struct {
			name string
			spec map[string]any
			want []string // substrings of the error
		}{
			{"no spec", nil, []string{"spec: Required value"}},
			{"no addresses", map[string]any{}, []string{"spec.addresses: Required value"}},
			{"empty addresses", map[string]any{"addresses": []any{}}, []string{"spec.addresses", "at least 1 items"}},
			{"too many addresses", map[string]any{"addresses": tooMany}, []string{"spec.addresses", "must have at most 64 items"}},
			{"prefix too long", map[string]any{"addresses": []any{"192.0.2.0/33"}},
				[]string{`spec.addresses[0]`, `"192.0.2.0/33" is neither a CIDR`}},
			{"garbage", map[string]any{"addresses": []any{"192.0.2.0/28", "foo"}},
				[]string{`spec.addresses[1]`, `"foo" is neither a CIDR (192.0.2.0/28, 2001:db8::/120) nor a range`}},
			{"bare address", map[string]any{"addresses": []any{"192.0.2.7"}},
				[]string{"write a single address as a /32 or /128 CIDR"}},
			{"leading zeros", map[string]any{"addresses": []any{"192.0.2.010-192.0.2.20"}},
				[]string{"is neither a CIDR"}},
			{"three-part range", map[string]any{"addresses": []any{"192.0.2.1-192.0.2.2-192.0.2.3"}},
				[]string{"is neither a CIDR"}},
			{"host bits", map[string]any{"addresses": []any{"192.0.2.5/24"}},
				[]string{`"192.0.2.5/24" has host bits set: the address before the slash must be the first one of the network, as in 192.0.2.0/24`}},
			{"ipv6 host bits", map[string]any{"addresses": []any{"2001:db8::1/64"}},
				[]string{`"2001:db8::1/64" has host bits set`, "as in 2001:db8::/64 rather than"}},
			{"mixed-family range", map[string]any{"addresses": []any{"192.0.2.1-2001:db8::1"}},
				[]string{`"192.0.2.1-2001:db8::1" mixes IPv4 and IPv6`}},
			{"inverted ipv4 range", map[string]any{"addresses": []any{"192.0.2.20-192.0.2.10"}},
				[]string{`"192.0.2.20-192.0.2.10" is an inverted range`}},
			{"inverted ipv4 range across octets", map[string]any{"addresses": []any{"10.0.0.0-9.255.255.255"}},
				[]string{"is an inverted range"}},
			{"too long", map[string]any{"addresses": []any{strings.Repeat("1", 101)}},
				[]string{"spec.addresses[0]", "Too long"}},
			{"vrid zero", vrrp(map[string]any{"virtualRouterIDs": "0-10"}),
				[]string{`virtualRouterIDs "0-10" must be a range first-last within 1-255 with first <= last`}},
			{"vrid inverted", vrrp(map[string]any{"virtualRouterIDs": "10-5"}),
				[]string{`virtualRouterIDs "10-5" must be a range first-last within 1-255`}},
			{"vrid too big", vrrp(map[string]any{"virtualRouterIDs": "1-300"}),
				[]string{`virtualRouterIDs "1-300" must be a range`}},
			{"vrid malformed", vrrp(map[string]any{"virtualRouterIDs": "1..5"}),
				[]string{"spec.vrrp.virtualRouterIDs", "should match"}},
			{"interval too short", vrrp(map[string]any{"advertisementInterval": "5ms"}),
				[]string{`advertisementInterval "5ms" must be between 10ms and 40s`}},
			{"interval too long", vrrp(map[string]any{"advertisementInterval": "41s"}),
				[]string{`advertisementInterval "41s" must be between 10ms and 40s`}},
			{"interval not centiseconds", vrrp(map[string]any{"advertisementInterval": "15ms"}),
				[]string{"in whole multiples of 10ms"}},
			{"interval sub-centisecond", vrrp(map[string]any{"advertisementInterval": "1.005s"}),
				[]string{"spec.vrrp.advertisementInterval", "should match"}},
			{"interval compound", vrrp(map[string]any{"advertisementInterval": "1s500ms"}),
				[]string{"spec.vrrp.advertisementInterval", "should match"}},
			{"interval not a duration", vrrp(map[string]any{"advertisementInterval": "1 day"}),
				[]string{"spec.vrrp.advertisementInterval", "should match"}},
			{"failback lower case", vrrp(map[string]any{"failback": "never"}),
				[]string{`spec.vrrp.failback: Unsupported value: "never"`, `"Delayed"`, `"Immediate"`, `"Never"`}},
			{"failbackDelay with Never", vrrp(map[string]any{"failback": "Never", "failbackDelay": "30s"}),
				[]string{"spec.vrrp.failbackDelay", "failbackDelay applies to failback Delayed only; this pool has failback Never"}},
			{"failbackDelay with Immediate", vrrp(map[string]any{"failback": "Immediate", "failbackDelay": "30s"}),
				[]string{"failbackDelay applies to failback Delayed only; this pool has failback Immediate"}},
			{"failbackDelay too long", vrrp(map[string]any{"failbackDelay": "1001s"}),
				[]string{`failbackDelay "1001s" must be between 0s and 1000s`}},
			{"failbackDelay not centiseconds", vrrp(map[string]any{"failbackDelay": "15ms"}),
				[]string{`failbackDelay "15ms" must be between 0s and 1000s in whole multiples of 10ms`}},
			{"failbackDelay not a duration", vrrp(map[string]any{"failbackDelay": "1m"}),
				[]string{"spec.vrrp.failbackDelay", "should match"}},
			{"interface too long", vrrp(map[string]any{"interface": "enp129s0f1.40940"}),
				[]string{"spec.vrrp.interface", "Too long"}},
			{"interface with slash", vrrp(map[string]any{"interface": "eth0/1"}),
				[]string{"spec.vrrp.interface", "should match"}},
			{"bad forwarding", map[string]any{"addresses": []any{"192.0.2.0/28"}, "forwarding": "dsr"},
				[]string{`spec.forwarding: Unsupported value: "dsr"`, `"nodeport"`}},
			{"bad icmpEcho", map[string]any{"addresses": []any{"192.0.2.0/28"}, "icmpEcho": "allow"},
				[]string{`spec.icmpEcho: Unsupported value: "allow"`, `"Allow"`, `"Drop"`}},
			{"negative nodePortSubsetSize", map[string]any{"addresses": []any{"192.0.2.0/28"}, "nodePortSubsetSize": int64(-1)},
				[]string{"spec.nodePortSubsetSize", "should be greater than or equal to 0"}},
			{"bad namespace", allocation(map[string]any{"namespaces": []any{"Web_Team"}}),
				[]string{"spec.serviceAllocation.namespaces[0]", "should match"}},
			{"duplicate namespace", allocation(map[string]any{"namespaces": []any{"web", "web"}}),
				[]string{"spec.serviceAllocation.namespaces[1]", "Duplicate value"}},
			{"bad operator", allocation(map[string]any{"serviceSelector": map[string]any{
				"matchExpressions": []any{map[string]any{"key": "a", "operator": "Like"}},
			}}), []string{`Unsupported value: "Like"`}},
			{"In without values", allocation(map[string]any{"namespaceSelector": map[string]any{
				"matchExpressions": []any{map[string]any{"key": "a", "operator": "In"}},
			}}), []string{"values must be non-empty for operators In and NotIn"}},
			{"Exists with values", vrrp(map[string]any{"nodeSelector": map[string]any{
				"matchExpressions": []any{map[string]any{"key": "a", "operator": "Exists", "values": []any{"x"}}},
			}}), []string{"spec.vrrp.nodeSelector.matchExpressions[0]", "empty for Exists and DoesNotExist"}},
			{"priority out of int32", allocation(map[string]any{"priority": int64(1) << 31}),
				[]string{"spec.serviceAllocation.priority"}},
			{"unknown field", map[string]any{"addresses": []any{"192.0.2.0/28"}, "autoassign": false},
				[]string{`unknown field "spec.autoassign"`}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				name := fmt.Sprintf("invalid-%d", i)
				obj := newPool(name, tc.spec)
				if tc.spec == nil {
					delete(obj.Object, "spec")
				}
				// Strict field validation turns unknown fields into errors
				// rather than silently pruning them.
				_, err := pools.Create(ctx, obj, metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict})
				if err == nil {
					_ = pools.Delete(context.Background(), name, metav1.DeleteOptions{})
					t.Fatalf("accepted %v", tc.spec)
				}
				if !apierrors.IsInvalid(err) && !apierrors.IsBadRequest(err) {
					t.Errorf("error is not Invalid or BadRequest: %v", err)
				}
				for _, want := range tc.want {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error does not mention %q:\n%v", want, err)
					}
				}
				t.Logf("%v", err)
			})
		}
	})

	t.Run("status", func(t *testing.T) {
		// A status as the controller writes it is accepted by the schema,
		// and the printer columns show it.
		u, err := pools.Create(ctx, newPool("status", map[string]any{"addresses": []any{"192.0.2.0/28", "2001:db8::/64"}}), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p, err := v1alpha1.FromUnstructured(u)
		if err != nil {
			t.Fatal(err)
		}
		p.Status = v1alpha1.IPPoolStatus{
			ObservedGeneration: p.Generation,
			Total:              "18446744073709551632",
			Used:               3,
			Free:               "18446744073709551629",
			IPv4:               &v1alpha1.FamilyStatus{Total: "16", Used: 2, Free: "14"},
			IPv6:               &v1alpha1.FamilyStatus{Total: "18446744073709551616", Used: 1, Free: "18446744073709551615"},
			OutOfRange:         1,
			Conditions: []metav1.Condition{{
				Type:               v1alpha1.ConditionReady,
				Status:             metav1.ConditionTrue,
				ObservedGeneration: p.Generation,
				LastTransitionTime: metav1.Now(),
				Reason:             "Allocatable",
				Message:            "addresses are available",
			}, {
				Type:               v1alpha1.ConditionConflicting,
				Status:             metav1.ConditionFalse,
				ObservedGeneration: p.Generation,
				LastTransitionTime: metav1.Now(),
				Reason:             "NoOverlap",
				Message:            "no older pool overlaps this one",
			}},
		}
		u, err = v1alpha1.ToUnstructured(p)
		if err != nil {
			t.Fatal(err)
		}
		u, err = pools.UpdateStatus(ctx, u, metav1.UpdateOptions{FieldValidation: metav1.FieldValidationStrict})
		if err != nil {
			t.Fatalf("status update rejected: %v", err)
		}
		if got, err := v1alpha1.FromUnstructured(u); err != nil || !reflect.DeepEqual(got.Status.IPv6, p.Status.IPv6) || len(got.Status.Conditions) != 2 {
			t.Errorf("status read back as %+v (err %v)", got.Status, err)
		}

		out, err := cp.Kubectl(ctx, "get", "ippools", "status")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("kubectl get ippools status:\n%s", out)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 2 {
			t.Fatalf("kubectl get ippools status printed:\n%s", out)
		}
		header := strings.Fields(lines[0])
		if want := []string{"NAME", "ADDRESSES", "TOTAL", "USED", "FREE", "AGE"}; !reflect.DeepEqual(header, want) {
			t.Errorf("header %v, want %v", header, want)
		}
		for _, want := range []string{"18446744073709551632", "3", "18446744073709551629", "192.0.2.0/28"} {
			if !strings.Contains(lines[1], want) {
				t.Errorf("row does not show %s:\n%s", want, out)
			}
		}
		out, err = cp.Kubectl(ctx, "get", "ipp", "status", "-o", "wide")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"PRIORITY", "AUTO", "READY", "True"} {
			if !strings.Contains(out, want) {
				t.Errorf("wide output lacks %s:\n%s", want, out)
			}
		}

		// A bad condition status is rejected.
		u.Object["status"].(map[string]any)["conditions"].([]any)[0].(map[string]any)["status"] = "Maybe"
		if _, err := pools.UpdateStatus(ctx, u, metav1.UpdateOptions{}); err == nil || !strings.Contains(err.Error(), `Unsupported value: "Maybe"`) {
			t.Errorf("condition status Maybe: err = %v", err)
		}
	})
}

// vrrp returns a valid spec with the given vrrp block.
func vrrp(v map[string]any) map[string]any {
	return map[string]any{"addresses": []any{"192.0.2.0/28"}, "vrrp": v}
}

// allocation returns a valid spec with the given serviceAllocation block.
func allocation(a map[string]any) map[string]any {
	return map[string]any{"addresses": []any{"192.0.2.0/28"}, "serviceAllocation": a}
}

// TestManifestsDryRun checks every manifest against the real API server:
// the install kustomization and the example pool are applied with
// --dry-run=server, and the controller's RBAC is checked by asking the
// apiserver what the ServiceAccount may do.
func TestManifestsDryRun(t *testing.T) {
	cp := controlplane.StartForTest(t)
	ctx := t.Context()

	// A server-side dry run creates nothing, so objects that others depend
	// on must exist first: the namespace for the namespaced objects and the
	// CRD for the example pool.
	if err := cp.Apply(ctx, manifestPath(t, "namespace.yaml"), manifestPath(t, "crd/ippools.keeplb.io.yaml")); err != nil {
		t.Fatal(err)
	}

	out, err := cp.Kubectl(ctx, "apply", "--server-side", "--field-manager=keeplb-dry-run", "--dry-run=server", "-k", manifestPath(t, ""))
	if err != nil {
		t.Fatalf("dry-run apply of manifests/: %v", err)
	}
	for _, want := range []string{
		"namespace/keeplb-system",
		"customresourcedefinition.apiextensions.k8s.io/ippools.keeplb.io",
		"serviceaccount/keeplb-controller",
		"clusterrole.rbac.authorization.k8s.io/keeplb:controller",
		"clusterrolebinding.rbac.authorization.k8s.io/keeplb:controller",
		"role.rbac.authorization.k8s.io/keeplb:controller:leader-election",
		"rolebinding.rbac.authorization.k8s.io/keeplb:controller:leader-election",
		"deployment.apps/keeplb-controller",
		"service/keeplb-controller-metrics",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run did not report %s:\n%s", want, out)
		}
	}
	t.Logf("kubectl apply -k manifests/ --dry-run=server:\n%s", out)

	out, err = cp.Kubectl(ctx, "apply", "--server-side", "--field-manager=keeplb-dry-run", "--dry-run=server", "-f", manifestPath(t, "examples/ippool.yaml"))
	if err != nil {
		t.Fatalf("dry-run apply of the example pool: %v", err)
	}
	if !strings.Contains(out, "ippool.keeplb.io/example") {
		t.Errorf("dry run of the example pool printed:\n%s", out)
	}

	// Apply the RBAC for real and ask what the controller may do.
	if err := cp.Apply(ctx, manifestPath(t, "controller/rbac.yaml")); err != nil {
		t.Fatal(err)
	}
	const sa = "system:serviceaccount:keeplb-system:keeplb-controller"
	for _, tc := range []struct {
		verb, resource, namespace string
		want                      bool
	}{
		{"watch", "services", "", true},
		{"patch", "services/status", "", true},
		{"list", "nodes", "", true},
		{"watch", "namespaces", "", true},
		{"create", "events", "default", true},
		{"create", "events.events.k8s.io", "default", true},
		{"list", "ippools.keeplb.io", "", true},
		{"patch", "ippools.keeplb.io/status", "", true},
		{"update", "leases.coordination.k8s.io", "keeplb-system", true},
		{"create", "leases.coordination.k8s.io", "keeplb-system", true},
		// Least privilege: no writes beyond the above.
		{"update", "ippools.keeplb.io", "", false},
		{"delete", "services", "default", false},
		{"update", "nodes", "", false},
		{"get", "secrets", "keeplb-system", false},
		{"list", "endpointslices.discovery.k8s.io", "", false},
		{"update", "leases.coordination.k8s.io", "kube-system", false},
		{"delete", "leases.coordination.k8s.io", "keeplb-system", false},
	} {
		resource, sub, _ := strings.Cut(tc.resource, "/")
		args := []string{"auth", "can-i", tc.verb, resource, "--subresource=" + sub, "--as", sa}
		if tc.namespace != "" {
			args = append(args, "-n", tc.namespace)
		} else {
			args = append(args, "--all-namespaces")
		}
		out, err := cp.Kubectl(ctx, args...)
		// kubectl auth can-i exits non-zero when the answer is no.
		got := strings.TrimSpace(out)
		if (got == "yes") != tc.want || (got != "yes" && got != "no") {
			t.Errorf("can-i %s %s -n %q: %q (err %v), want allowed=%v", tc.verb, tc.resource, tc.namespace, got, err, tc.want)
		}
	}
}
