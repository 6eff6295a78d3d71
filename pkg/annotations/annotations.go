// Package annotations parses the keeplb.io/* annotations of a Service.
//
// It is pure: it reads a Service and returns what the annotations ask for,
// or an error that names the annotation at fault and how to fix it.
package annotations

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unicode"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// The annotations keeplb reads or writes on Services (their names are the
// API's, v1alpha1.Annotation*).
const (
	// Prefix starts every keeplb annotation.
	Prefix = v1alpha1.AnnotationPrefix
	// Pool names the IPPool to draw the address from.
	Pool = v1alpha1.AnnotationPool
	// IPs names the exact addresses, at most one per family.
	IPs = v1alpha1.AnnotationIPs
	// ShareKey lets Services of one namespace share an address.
	ShareKey = v1alpha1.AnnotationShareKey
	// Forwarding overrides the pool's forwarding mode.
	Forwarding = v1alpha1.AnnotationForwarding
	// Holder is written by the speaker: the node holding the VIP.
	Holder = v1alpha1.AnnotationHolder
	// Scheduler chooses the IPVS scheduler (used by the speaker).
	Scheduler = v1alpha1.AnnotationScheduler
)

// settable lists the annotations a user may set, for the hint given when an
// unknown one (most likely a typo) is found.
var settable = []string{Pool, IPs, ShareKey, Forwarding, Scheduler}

// known lists every annotation under Prefix, to catch typos: the settable
// ones and the one the speaker writes.
var known = append(slices.Clone(settable), Holder)

// LoadBalancerIPField names the deprecated Service field keeplb honours.
const LoadBalancerIPField = "spec.loadBalancerIP"

// Config is what a Service's annotations ask of keeplb.
type Config struct {
	// Pool is the IPPool named by keeplb.io/pool.
	Pool string
	// IPs are the addresses from keeplb.io/ips or spec.loadBalancerIP.
	IPs []netip.Addr
	// IPsSource is the annotation or field IPs came from.
	IPsSource string
	// ShareKey is keeplb.io/share-key.
	ShareKey string
	// Forwarding is keeplb.io/forwarding, or empty for the pool's default.
	Forwarding v1alpha1.Forwarding
	// Warnings are problems that do not stop allocation, such as unknown
	// keeplb.io annotations.
	Warnings []string
}

// Parse reads svc's keeplb annotations. An error is an *allocator.Error
// with reason InvalidAnnotation naming the annotation.
func Parse(svc *v1.Service) (Config, error) {
	var c Config
	ann := svc.Annotations
	for k := range ann {
		if strings.HasPrefix(k, Prefix) && !slices.Contains(known, k) {
			c.Warnings = append(c.Warnings, fmt.Sprintf("unknown annotation %s is ignored; keeplb reads %s", k, strings.Join(settable, ", ")))
		}
	}
	slices.Sort(c.Warnings)

	if v, ok := ann[Pool]; ok {
		v = strings.TrimSpace(v)
		if msgs := validation.IsDNS1123Subdomain(v); len(msgs) > 0 {
			return c, invalid(Pool, "%q is not an IPPool name (%s); use a name from `kubectl get ippools`", v, strings.Join(msgs, "; "))
		}
		c.Pool = v
	}

	var lbIP netip.Addr
	if lb := strings.TrimSpace(svc.Spec.LoadBalancerIP); lb != "" {
		a, err := netip.ParseAddr(lb)
		if err != nil {
			return c, invalid(LoadBalancerIPField, "%q is not an IP address; use the keeplb.io/ips annotation instead", lb)
		}
		if a.Zone() != "" {
			// The API server only warns about a zone here; taken as
			// given, a zoned address is a different key for the same
			// address, and a duplicate waiting to happen.
			return c, invalid(LoadBalancerIPField, "%q has a zone; a LoadBalancer address belongs to no one link, so write %s, or better use the keeplb.io/ips annotation", lb, a.WithZone(""))
		}
		lbIP = a.Unmap()
	}
	if v, ok := ann[IPs]; ok {
		ips, err := parseIPs(v)
		if err != nil {
			return c, err
		}
		c.IPs, c.IPsSource = ips, IPs
		if lbIP.IsValid() && !slices.Contains(ips, lbIP) {
			return c, invalid(IPs, "disagrees with %s %q; remove the deprecated %s", LoadBalancerIPField, svc.Spec.LoadBalancerIP, LoadBalancerIPField)
		}
	} else if lbIP.IsValid() {
		c.IPs, c.IPsSource = []netip.Addr{lbIP}, LoadBalancerIPField
	}

	if v, ok := ann[ShareKey]; ok {
		v = strings.TrimSpace(v)
		if msgs := validation.IsValidLabelValue(v); len(msgs) > 0 || v == "" {
			return c, invalid(ShareKey, "%q is not a valid key; use up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", v)
		}
		c.ShareKey = v
	}

	if v, ok := ann[Forwarding]; ok {
		f, err := parseForwarding(v)
		if err != nil {
			return c, err
		}
		c.Forwarding = f
	}
	return c, nil
}

func parseIPs(v string) ([]netip.Addr, error) {
	var out []netip.Addr
	seen := map[allocator.Family]bool{}
	if strings.TrimFunc(v, func(r rune) bool { return r == ',' || unicode.IsSpace(r) }) == "" {
		return nil, invalid(IPs, "is empty; give one address per family or remove the annotation")
	}
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			// "192.0.2.1," may be the half of an edit that lost its
			// second address: say so rather than guess.
			return nil, invalid(IPs, "%q has an empty entry; separate addresses by single commas, with none at the start or end", v)
		}
		a, err := netip.ParseAddr(part)
		if err != nil {
			return nil, invalid(IPs, "%q is not an IP address; write addresses separated by commas, e.g. 192.0.2.10,2001:db8::10", part)
		}
		if a.Zone() != "" {
			return nil, invalid(IPs, "%q has a zone; a LoadBalancer address belongs to no one link, so write %s", part, a.WithZone(""))
		}
		a = a.Unmap()
		f := allocator.FamilyOf(a)
		if seen[f] {
			return nil, invalid(IPs, "gives two %s addresses; give at most one address per family", f)
		}
		seen[f] = true
		out = append(out, a)
	}
	return out, nil
}

func invalid(field, format string, args ...any) error {
	return &allocator.Error{Reason: allocator.ReasonInvalid, Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Handles reports whether keeplb is responsible for svc's load balancer:
// svc is of type LoadBalancer and either sets class as its
// spec.loadBalancerClass, or sets none while defaultClass holds. The
// controller, the speaker, the dataplane and `keeplb status` all decide by
// this one rule.
func Handles(svc *v1.Service, class string, defaultClass bool) bool {
	if svc.Spec.Type != v1.ServiceTypeLoadBalancer {
		return false
	}
	if c := svc.Spec.LoadBalancerClass; c != nil {
		return *c == class
	}
	return defaultClass
}

// DefaultClass is the spec.loadBalancerClass keeplb answers to unless its
// --load-balancer-class says otherwise, on the controller, the speakers
// and `keeplb status` alike.
const DefaultClass = "keeplb.io/vip"

// ValidateClass checks a --load-balancer-class value: the API server only
// admits a label-style key, and a prefix keeps it from clashing with
// another implementation's class. flag names the flag, for the error.
func ValidateClass(flag, class string) error {
	if msgs := validation.IsQualifiedName(class); len(msgs) > 0 || !strings.Contains(class, "/") {
		return fmt.Errorf("%s %q must be a label-style key with a prefix, such as %s", flag, class, DefaultClass)
	}
	return nil
}

// ForwardingOf returns svc's forwarding mode: keeplb.io/forwarding, else
// its pool's spec.forwarding (pool may be nil), else nodeport. An invalid
// annotation is ignored, as if absent, and returned as an error naming it,
// so that the caller can report it on the Service.
func ForwardingOf(svc *v1.Service, pool *v1alpha1.IPPool) (v1alpha1.Forwarding, error) {
	var err error
	if v, ok := svc.Annotations[Forwarding]; ok {
		f, perr := parseForwarding(v)
		if perr == nil {
			return f, nil
		}
		err = perr
	}
	if pool != nil {
		return pool.Spec.ForwardingOrDefault(), err
	}
	return v1alpha1.ForwardingNodePort, err
}

func parseForwarding(v string) (v1alpha1.Forwarding, error) {
	f := v1alpha1.Forwarding(strings.TrimSpace(v))
	if !f.Valid() {
		return "", invalid(Forwarding, "%q is not a forwarding mode; use nodeport, pod or kube-proxy", v)
	}
	return f, nil
}

// DefaultScheduler is the IPVS scheduler used without keeplb.io/scheduler.
const DefaultScheduler = "rr"

// Schedulers are the IPVS schedulers keeplb.io/scheduler may name.
var Schedulers = []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"}

// SchedulerOf returns svc's IPVS scheduler: keeplb.io/scheduler, else
// DefaultScheduler. An unknown scheduler gives DefaultScheduler and an
// error naming the annotation, for the caller to report on the Service.
func SchedulerOf(svc *v1.Service) (string, error) {
	v, ok := svc.Annotations[Scheduler]
	if !ok {
		return DefaultScheduler, nil
	}
	s := strings.TrimSpace(v)
	if !slices.Contains(Schedulers, s) {
		return DefaultScheduler, invalid(Scheduler, "%q is not an IPVS scheduler keeplb knows; use one of %s", v, strings.Join(Schedulers, ", "))
	}
	return s, nil
}
