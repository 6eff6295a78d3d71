package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// DeepCopyInto copies in into out.
func (in *IPPool) DeepCopyInto(out *IPPool) {
	*out = *in
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	in.Spec.DeepCopyInto(&out.Spec)
	in.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy of in.
func (in *IPPool) DeepCopy() *IPPool {
	if in == nil {
		return nil
	}
	out := new(IPPool)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *IPPool) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyInto copies in into out.
func (in *IPPoolList) DeepCopyInto(out *IPPoolList) {
	*out = *in
	out.TypeMeta = in.TypeMeta
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]IPPool, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
}

// DeepCopy returns a deep copy of in.
func (in *IPPoolList) DeepCopy() *IPPoolList {
	if in == nil {
		return nil
	}
	out := new(IPPoolList)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *IPPoolList) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyInto copies in into out.
func (in *IPPoolSpec) DeepCopyInto(out *IPPoolSpec) {
	*out = *in
	out.Addresses = append([]string(nil), in.Addresses...)
	if in.AutoAssign != nil {
		v := *in.AutoAssign
		out.AutoAssign = &v
	}
	if in.ServiceAllocation != nil {
		out.ServiceAllocation = new(ServiceAllocation)
		in.ServiceAllocation.DeepCopyInto(out.ServiceAllocation)
	}
	if in.NodePortSubsetSize != nil {
		v := *in.NodePortSubsetSize
		out.NodePortSubsetSize = &v
	}
	if in.VRRP != nil {
		out.VRRP = new(VRRP)
		in.VRRP.DeepCopyInto(out.VRRP)
	}
}

// DeepCopyInto copies in into out.
func (in *ServiceAllocation) DeepCopyInto(out *ServiceAllocation) {
	*out = *in
	out.Namespaces = append([]string(nil), in.Namespaces...)
	out.NamespaceSelector = in.NamespaceSelector.DeepCopy()
	out.ServiceSelector = in.ServiceSelector.DeepCopy()
}

// DeepCopyInto copies in into out.
func (in *VRRP) DeepCopyInto(out *VRRP) {
	*out = *in
	if in.AdvertisementInterval != nil {
		d := *in.AdvertisementInterval
		out.AdvertisementInterval = &d
	}
	if in.FailbackDelay != nil {
		d := *in.FailbackDelay
		out.FailbackDelay = &d
	}
	out.NodeSelector = in.NodeSelector.DeepCopy()
}

// DeepCopyInto copies in into out.
func (in *IPPoolStatus) DeepCopyInto(out *IPPoolStatus) {
	*out = *in
	if in.IPv4 != nil {
		v := *in.IPv4
		out.IPv4 = &v
	}
	if in.IPv6 != nil {
		v := *in.IPv6
		out.IPv6 = &v
	}
	if in.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(in.Conditions))
		for i := range in.Conditions {
			in.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
}
