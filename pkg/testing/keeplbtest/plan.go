package keeplbtest

import (
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// Plan returns the cluster's VRRP plan as every speaker computes it, from
// what the API holds now plus extra Services (to try out addresses before
// asking for them), with keeplb's default class.
func Plan(t testing.TB, client kubernetes.Interface, dyn dynamic.Interface, extra ...*v1.Service) vrrp.Plan {
	t.Helper()
	ctx := t.Context()
	in := dataplane.Inputs{Class: annotations.DefaultClass, DefaultClass: true}
	svcs, err := client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range svcs.Items {
		in.Services = append(in.Services, &svcs.Items[i])
	}
	in.Services = append(in.Services, extra...)
	nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range nodes.Items {
		in.Nodes = append(in.Nodes, &nodes.Items[i])
	}
	eps, err := client.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range eps.Items {
		in.Slices = append(in.Slices, &eps.Items[i])
	}
	pools, err := dyn.Resource(v1alpha1.IPPoolResource).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pools.Items {
		p, err := v1alpha1.FromUnstructured(&pools.Items[i])
		if err != nil {
			t.Fatal(err)
		}
		in.Pools = append(in.Pools, p)
	}
	pin, _ := speaker.PlanInput(in)
	return vrrp.Compute(pin)
}
