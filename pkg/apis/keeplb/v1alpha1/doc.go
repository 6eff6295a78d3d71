// Package v1alpha1 holds the keeplb.io/v1alpha1 API: the IPPool resource
// from which the controller draws the VIPs of LoadBalancer Services.
//
// The structs are hand-written and converted from unstructured objects read
// through client-go's dynamic client; DeepCopy methods are written by hand in
// deepcopy.go and checked by a round-trip test.
package v1alpha1
