package v1alpha1_test

import (
	"os"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

const crdPath = "../../../../manifests/crd/ippools.keeplb.io.yaml"

// loadCRD reads the IPPool CRD manifest, rejecting unknown fields so that a
// misspelt schema keyword fails here rather than being dropped silently.
func loadCRD(t *testing.T) *apiextensionsv1.CustomResourceDefinition {
	t.Helper()
	data, err := os.ReadFile(crdPath)
	if err != nil {
		t.Fatal(err)
	}
	crd := &apiextensionsv1.CustomResourceDefinition{}
	if err := yaml.UnmarshalStrict(data, crd); err != nil {
		t.Fatalf("%s does not parse as a CustomResourceDefinition: %v", crdPath, err)
	}
	return crd
}

// ippoolSchema returns the schema of the only version, checking the naming
// and version settings that the rest of keeplb relies on.
func ippoolSchema(t *testing.T) *apiextensionsv1.JSONSchemaProps {
	t.Helper()
	crd := loadCRD(t)
	res := v1alpha1.IPPoolResource
	if want := res.Resource + "." + res.Group; crd.Name != want {
		t.Errorf("metadata.name = %q, want %q", crd.Name, want)
	}
	if crd.Spec.Group != v1alpha1.GroupName {
		t.Errorf("group = %q, want %q", crd.Spec.Group, v1alpha1.GroupName)
	}
	if crd.Spec.Scope != apiextensionsv1.ClusterScoped {
		t.Errorf("scope = %q, want Cluster", crd.Spec.Scope)
	}
	n := crd.Spec.Names
	if n.Kind != v1alpha1.IPPoolKind || n.ListKind != v1alpha1.IPPoolKind+"List" || n.Plural != res.Resource || n.Singular != "ippool" {
		t.Errorf("names = %+v", n)
	}
	if len(crd.Spec.Versions) != 1 {
		t.Fatalf("got %d versions, want 1", len(crd.Spec.Versions))
	}
	v := crd.Spec.Versions[0]
	if v.Name != res.Version || !v.Served || !v.Storage {
		t.Errorf("version %q served=%v storage=%v, want %q served and stored", v.Name, v.Served, v.Storage, res.Version)
	}
	if v.Subresources == nil || v.Subresources.Status == nil {
		t.Error("the status subresource is not enabled")
	}
	if v.Schema == nil || v.Schema.OpenAPIV3Schema == nil {
		t.Fatal("version has no openAPIV3Schema")
	}
	return v.Schema.OpenAPIV3Schema
}

// leafTypes are API types whose schema is written out by hand in the CRD
// rather than derived field by field here; their presence and basic type are
// checked, and their inner structure by leafChecks.
var leafTypes = map[reflect.Type]string{
	reflect.TypeFor[metav1.LabelSelector](): "object",
	reflect.TypeFor[metav1.Condition]():     "object",
	reflect.TypeFor[metav1.Duration]():      "string",
	reflect.TypeFor[metav1.Time]():          "string",
}

// jsonName returns the JSON name of a struct field, or "" when the field is
// not serialised or is inlined.
func jsonName(f reflect.StructField) string {
	tag := f.Tag.Get("json")
	if tag == "-" || !f.IsExported() {
		return ""
	}
	name, _, _ := strings.Cut(tag, ",")
	if name == "" {
		if f.Anonymous {
			return "" // inlined: TypeMeta and the like
		}
		return f.Name
	}
	return name
}

// schemaType is the OpenAPI type a Go type must have in the CRD.
func schemaType(t reflect.Type) string {
	if s, ok := leafTypes[t]; ok {
		return s
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.Struct, reflect.Map:
		return "object"
	}
	return "unsupported Go kind " + t.Kind().String()
}

// compare walks Go type t and schema s together and reports every field
// present on one side only, and every type mismatch.
func compare(t *testing.T, path string, typ reflect.Type, s *apiextensionsv1.JSONSchemaProps) {
	t.Helper()
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	if want := schemaType(typ); s.Type != want {
		t.Errorf("%s: schema type %q, Go type %s wants %q", path, s.Type, typ, want)
		return
	}
	if _, ok := leafTypes[typ]; ok {
		return
	}
	switch typ.Kind() {
	case reflect.Int32:
		if s.Format != "int32" {
			t.Errorf("%s: Go type %s wants format int32, schema has %q", path, typ, s.Format)
		}
	case reflect.Int64:
		if s.Format != "int64" {
			t.Errorf("%s: Go type %s wants format int64, schema has %q", path, typ, s.Format)
		}
	case reflect.Slice, reflect.Array:
		if s.Items == nil || s.Items.Schema == nil {
			t.Errorf("%s: array without an items schema", path)
			return
		}
		compare(t, path+"[]", typ.Elem(), s.Items.Schema)
	case reflect.Map:
		if s.AdditionalProperties == nil || s.AdditionalProperties.Schema == nil {
			t.Errorf("%s: map without an additionalProperties schema", path)
			return
		}
		compare(t, path+"{}", typ.Elem(), s.AdditionalProperties.Schema)
	case reflect.Struct:
		compareStruct(t, path, typ, s)
	}
}

// compareStruct compares the JSON fields of struct type typ with the
// properties of s, in both directions, and recurses into each field.
func compareStruct(t *testing.T, path string, typ reflect.Type, s *apiextensionsv1.JSONSchemaProps) {
	t.Helper()
	goFields := map[string]reflect.Type{}
	var goRequired []string
	for f := range typ.Fields() {
		name := jsonName(f)
		if name == "" {
			continue
		}
		goFields[name] = f.Type
		if !strings.Contains(f.Tag.Get("json"), ",omitempty") && f.Type.Kind() != reflect.Pointer {
			goRequired = append(goRequired, name)
		}
	}
	for name, ft := range goFields {
		fs, ok := s.Properties[name]
		if !ok {
			t.Errorf("%s.%s: Go field missing from the CRD schema", path, name)
			continue
		}
		compare(t, path+"."+name, ft, &fs)
	}
	for name := range s.Properties {
		if _, ok := goFields[name]; !ok {
			t.Errorf("%s.%s: CRD schema field missing from the Go type %s", path, name, typ)
		}
	}
	// A field the schema requires must always be serialised by Go,
	// or objects written by the controller would fail validation.
	for _, name := range s.Required {
		if !slices.Contains(goRequired, name) {
			t.Errorf("%s.%s: required by the CRD but omitempty or a pointer in Go", path, name)
		}
	}
}

func TestCRDMatchesGoTypes(t *testing.T) {
	root := ippoolSchema(t)
	if root.Type != "object" {
		t.Fatalf("root schema type %q", root.Type)
	}
	var top []string
	for name := range root.Properties {
		top = append(top, name)
	}
	sort.Strings(top)
	if want := []string{"apiVersion", "kind", "metadata", "spec", "status"}; !slices.Equal(top, want) {
		t.Errorf("top-level properties %v, want %v", top, want)
	}
	if !slices.Contains(root.Required, "spec") {
		t.Error("spec is not required")
	}
	pool := reflect.TypeFor[v1alpha1.IPPool]()
	for _, name := range []string{"Spec", "Status"} {
		f, _ := pool.FieldByName(name)
		s := root.Properties[jsonName(f)]
		compare(t, jsonName(f), f.Type, &s)
	}
}

// prop follows a dotted path of property names ("[]" steps into items).
func prop(t *testing.T, s *apiextensionsv1.JSONSchemaProps, path string) *apiextensionsv1.JSONSchemaProps {
	t.Helper()
	for step := range strings.SplitSeq(path, ".") {
		if step == "[]" {
			if s.Items == nil || s.Items.Schema == nil {
				t.Fatalf("%s: no items schema at %q", path, step)
			}
			s = s.Items.Schema
			continue
		}
		p, ok := s.Properties[step]
		if !ok {
			t.Fatalf("%s: no property %q", path, step)
		}
		s = &p
	}
	return s
}

// TestCRDLeafSchemas checks the hand-written schemas of the metav1 types
// that TestCRDMatchesGoTypes treats as leaves.
func TestCRDLeafSchemas(t *testing.T) {
	root := ippoolSchema(t)
	selectors := []string{
		"spec.serviceAllocation.namespaceSelector",
		"spec.serviceAllocation.serviceSelector",
		"spec.vrrp.nodeSelector",
	}
	for _, path := range selectors {
		sel := prop(t, root, path)
		compareStruct(t, path, reflect.TypeFor[metav1.LabelSelector](), sel)
		op := prop(t, sel, "matchExpressions.[].operator")
		var ops []string
		for _, e := range op.Enum {
			ops = append(ops, strings.Trim(string(e.Raw), `"`))
		}
		if want := []string{"In", "NotIn", "Exists", "DoesNotExist"}; !slices.Equal(ops, want) {
			t.Errorf("%s operator enum %v, want %v", path, ops, want)
		}
		if sel.XMapType == nil || *sel.XMapType != "atomic" {
			t.Errorf("%s: want x-kubernetes-map-type atomic", path)
		}
	}

	conds := prop(t, root, "status.conditions")
	if conds.XListType == nil || *conds.XListType != "map" || !slices.Equal(conds.XListMapKeys, []string{"type"}) {
		t.Errorf("status.conditions: want list-type map keyed by type, got %v %v", conds.XListType, conds.XListMapKeys)
	}
	cond := conds.Items.Schema
	compareStruct(t, "status.conditions[]", reflect.TypeFor[metav1.Condition](), cond)
	if f := prop(t, cond, "lastTransitionTime").Format; f != "date-time" {
		t.Errorf("lastTransitionTime format %q, want date-time", f)
	}
	var statuses []string
	for _, e := range prop(t, cond, "status").Enum {
		statuses = append(statuses, strings.Trim(string(e.Raw), `"`))
	}
	if want := []string{"True", "False", "Unknown"}; !slices.Equal(statuses, want) {
		t.Errorf("condition status enum %v, want %v", statuses, want)
	}
}

func TestCRDDefaults(t *testing.T) {
	root := ippoolSchema(t)
	for path, want := range map[string]string{
		"spec.autoAssign":                 `true`,
		"spec.avoidBuggyIPs":              `false`,
		"spec.forwarding":                 `"` + string(v1alpha1.ForwardingNodePort) + `"`,
		"spec.icmpEcho":                   `"` + string(v1alpha1.ICMPEchoAllow) + `"`,
		"spec.nodePortSubsetSize":         strconv.Itoa(v1alpha1.DefaultNodePortSubsetSize),
		"spec.vrrp.virtualRouterIDs":      `"1-255"`,
		"spec.vrrp.advertisementInterval": `"1s"`,
		"spec.vrrp.failback":              `"` + string(v1alpha1.FailbackDelayed) + `"`,
	} {
		s := prop(t, root, path)
		if s.Default == nil || string(s.Default.Raw) != want {
			got := "none"
			if s.Default != nil {
				got = string(s.Default.Raw)
			}
			t.Errorf("%s: default %s, want %s", path, got, want)
		}
	}
	var modes []v1alpha1.Forwarding
	for _, e := range prop(t, root, "spec.forwarding").Enum {
		modes = append(modes, v1alpha1.Forwarding(strings.Trim(string(e.Raw), `"`)))
	}
	for _, m := range modes {
		if !m.Valid() {
			t.Errorf("forwarding enum value %q is not a valid Forwarding", m)
		}
	}
	if len(modes) != 3 {
		t.Errorf("forwarding enum %v, want the three modes", modes)
	}
	var echo []v1alpha1.ICMPEcho
	for _, e := range prop(t, root, "spec.icmpEcho").Enum {
		echo = append(echo, v1alpha1.ICMPEcho(strings.Trim(string(e.Raw), `"`)))
	}
	if !slices.Equal(echo, []v1alpha1.ICMPEcho{v1alpha1.ICMPEchoAllow, v1alpha1.ICMPEchoDrop}) {
		t.Errorf("icmpEcho enum %v, want Allow and Drop", echo)
	}
	for _, e := range echo {
		if !e.Valid() {
			t.Errorf("icmpEcho enum value %q is not a valid ICMPEcho", e)
		}
	}
	if v1alpha1.ICMPEcho("allow").Valid() {
		t.Error(`ICMPEcho("allow").Valid() = true; the enum is case-sensitive`)
	}
	var failback []v1alpha1.Failback
	for _, e := range prop(t, root, "spec.vrrp.failback").Enum {
		failback = append(failback, v1alpha1.Failback(strings.Trim(string(e.Raw), `"`)))
	}
	if !slices.Equal(failback, []v1alpha1.Failback{v1alpha1.FailbackDelayed, v1alpha1.FailbackImmediate, v1alpha1.FailbackNever}) {
		t.Errorf("failback enum %v, want Delayed, Immediate and Never", failback)
	}
	for _, f := range failback {
		if !f.Valid() {
			t.Errorf("failback enum value %q is not a valid Failback", f)
		}
	}
	if v1alpha1.Failback("").Valid() || v1alpha1.Failback("never").Valid() {
		t.Error(`Failback "" or "never" is Valid; the enum is case-sensitive and has a default`)
	}
}

// fullPool returns an IPPool with every field, pointer, slice and map set.
func fullPool() *v1alpha1.IPPool {
	autoAssign := false
	selector := func(k string) *metav1.LabelSelector {
		return &metav1.LabelSelector{
			MatchLabels: map[string]string{k: "yes"},
			MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: k + "-tier", Operator: metav1.LabelSelectorOpIn, Values: []string{"a", "b"}},
			},
		}
	}
	return &v1alpha1.IPPool{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: v1alpha1.IPPoolKind},
		ObjectMeta: metav1.ObjectMeta{
			Name:              "full",
			Generation:        3,
			Labels:            map[string]string{"env": "test"},
			Annotations:       map[string]string{"note": "x"},
			CreationTimestamp: metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)),
		},
		Spec: v1alpha1.IPPoolSpec{
			Addresses:     []string{"192.0.2.0/28", "2001:db8::10-2001:db8::20"},
			AutoAssign:    &autoAssign,
			AvoidBuggyIPs: true,
			ServiceAllocation: &v1alpha1.ServiceAllocation{
				Priority:          7,
				Namespaces:        []string{"team-a", "team-b"},
				NamespaceSelector: selector("ns"),
				ServiceSelector:   selector("svc"),
			},
			Forwarding:         v1alpha1.ForwardingPod,
			ICMPEcho:           v1alpha1.ICMPEchoDrop,
			NodePortSubsetSize: ptr.To[int32](8),
			VRRP: &v1alpha1.VRRP{
				Interface:             "eth0",
				VirtualRouterIDs:      "10-20",
				AdvertisementInterval: &metav1.Duration{Duration: 200 * time.Millisecond},
				Unicast:               true,
				NodeSelector:          selector("node"),
				Failback:              v1alpha1.FailbackDelayed,
				FailbackDelay:         &metav1.Duration{Duration: 90 * time.Second},
			},
		},
		Status: v1alpha1.IPPoolStatus{
			ObservedGeneration: 3,
			Total:              "33",
			Used:               2,
			Free:               "31",
			IPv4:               &v1alpha1.FamilyStatus{Total: "16", Used: 1, Free: "15"},
			IPv6:               &v1alpha1.FamilyStatus{Total: "17", Used: 1, Free: "16"},
			OutOfRange:         1,
			Conditions: []metav1.Condition{{
				Type:               v1alpha1.ConditionReady,
				Status:             metav1.ConditionTrue,
				ObservedGeneration: 3,
				LastTransitionTime: metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 6, 0, time.UTC)),
				Reason:             "Allocatable",
				Message:            "33 addresses",
			}},
		},
	}
}

// assertFullyPopulated fails if any field reachable from v is a zero value,
// so that the round-trip tests cannot silently miss a newly added field.
func assertFullyPopulated(t *testing.T, path string, v reflect.Value) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			t.Errorf("fullPool leaves %s nil", path)
			return
		}
		if v.Elem().Kind() != reflect.Struct {
			return // a set *bool may well point to false
		}
		assertFullyPopulated(t, path, v.Elem())
	case reflect.Struct:
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if jsonName(f) == "" && !f.Anonymous {
				continue
			}
			assertFullyPopulated(t, path+"."+f.Name, v.Field(i))
		}
	case reflect.Slice, reflect.Map:
		if v.Len() == 0 {
			t.Errorf("fullPool leaves %s empty", path)
		}
	default:
		if v.IsZero() {
			t.Errorf("fullPool leaves %s zero", path)
		}
	}
}

func TestDeepCopy(t *testing.T) {
	orig := fullPool()
	for _, name := range []string{"Spec", "Status"} {
		assertFullyPopulated(t, name, reflect.ValueOf(orig).Elem().FieldByName(name))
	}

	cp := orig.DeepCopy()
	if !reflect.DeepEqual(orig, cp) {
		t.Fatalf("DeepCopy differs from the original:\n%+v\n%+v", orig, cp)
	}
	if obj, ok := orig.DeepCopyObject().(*v1alpha1.IPPool); !ok || !reflect.DeepEqual(orig, obj) {
		t.Fatal("DeepCopyObject differs from the original")
	}

	// Mutate everything the copy might share with the original.
	cp.Labels["env"] = "changed"
	cp.Spec.Addresses[0] = "198.51.100.0/24"
	*cp.Spec.AutoAssign = true
	*cp.Spec.NodePortSubsetSize = 99
	sa := cp.Spec.ServiceAllocation
	sa.Priority = 99
	sa.Namespaces[0] = "changed"
	sa.NamespaceSelector.MatchLabels["ns"] = "changed"
	sa.NamespaceSelector.MatchExpressions[0].Values[0] = "changed"
	sa.ServiceSelector.MatchLabels["svc"] = "changed"
	sa.ServiceSelector.MatchExpressions[0].Values[0] = "changed"
	cp.Spec.VRRP.Interface = "changed"
	cp.Spec.VRRP.AdvertisementInterval.Duration = time.Hour
	cp.Spec.VRRP.NodeSelector.MatchLabels["node"] = "changed"
	cp.Spec.VRRP.NodeSelector.MatchExpressions[0].Values[0] = "changed"
	cp.Status.IPv4.Used = 99
	cp.Status.IPv6.Free = "0"
	cp.Status.Conditions[0].Status = metav1.ConditionFalse
	cp.Status.Conditions[0].LastTransitionTime = metav1.Now()

	if !reflect.DeepEqual(orig, fullPool()) {
		t.Errorf("mutating the copy changed the original:\n%+v", orig)
	}

	list := &v1alpha1.IPPoolList{Items: []v1alpha1.IPPool{*fullPool()}}
	lcp := list.DeepCopy()
	if !reflect.DeepEqual(list, lcp) {
		t.Fatal("IPPoolList DeepCopy differs from the original")
	}
	lcp.Items[0].Spec.Addresses[0] = "changed"
	lcp.Items[0].Spec.VRRP.NodeSelector.MatchLabels["node"] = "changed"
	if !reflect.DeepEqual(list.Items[0], *fullPool()) {
		t.Error("mutating the list copy changed the original")
	}
	if _, ok := list.DeepCopyObject().(*v1alpha1.IPPoolList); !ok {
		t.Error("IPPoolList DeepCopyObject returned the wrong type")
	}

	var nilPool *v1alpha1.IPPool
	if nilPool.DeepCopy() != nil {
		t.Error("DeepCopy of a nil IPPool is not nil")
	}
	empty := &v1alpha1.IPPool{}
	if !reflect.DeepEqual(empty.DeepCopy(), empty) {
		t.Error("DeepCopy of an empty IPPool differs (nil slices must stay nil)")
	}
}

func TestUnstructuredRoundTrip(t *testing.T) {
	orig := fullPool()
	u, err := v1alpha1.ToUnstructured(orig)
	if err != nil {
		t.Fatal(err)
	}
	if u.GetAPIVersion() != "keeplb.io/v1alpha1" || u.GetKind() != "IPPool" || u.GetName() != "full" {
		t.Errorf("unstructured identity %s %s %s", u.GetAPIVersion(), u.GetKind(), u.GetName())
	}
	// Spot-check the JSON names the CRD schema relies on.
	if got, _, _ := unstructured.NestedString(u.Object, "spec", "vrrp", "advertisementInterval"); got != "200ms" {
		t.Errorf("spec.vrrp.advertisementInterval = %q, want 200ms", got)
	}
	if got, _, _ := unstructured.NestedString(u.Object, "spec", "vrrp", "virtualRouterIDs"); got != "10-20" {
		t.Errorf("spec.vrrp.virtualRouterIDs = %q, want 10-20", got)
	}
	if got, _, _ := unstructured.NestedStringSlice(u.Object, "spec", "serviceAllocation", "namespaces"); !slices.Equal(got, []string{"team-a", "team-b"}) {
		t.Errorf("spec.serviceAllocation.namespaces = %v", got)
	}

	back, err := v1alpha1.FromUnstructured(u)
	if err != nil {
		t.Fatal(err)
	}
	// Semantic equality: metav1.Time decodes into the local time zone.
	if !equality.Semantic.DeepEqual(orig, back) {
		t.Errorf("round trip changed the pool:\n got %+v\nwant %+v", back, orig)
	}

	// The TypeMeta of the result comes from the object, whatever the input
	// pool carried.
	bare := fullPool()
	bare.TypeMeta = metav1.TypeMeta{}
	u, err = v1alpha1.ToUnstructured(bare)
	if err != nil {
		t.Fatal(err)
	}
	if u.GetAPIVersion() != "keeplb.io/v1alpha1" || u.GetKind() != "IPPool" {
		t.Errorf("ToUnstructured did not set apiVersion/kind: %s %s", u.GetAPIVersion(), u.GetKind())
	}

	if _, err := v1alpha1.FromUnstructured(orig); err == nil {
		t.Error("FromUnstructured accepted a typed IPPool")
	}
	bad := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "keeplb.io/v1alpha1", "kind": "IPPool",
		"metadata": map[string]any{"name": "bad"},
		"spec":     map[string]any{"addresses": "not-a-list"},
	}}
	if _, err := v1alpha1.FromUnstructured(bad); err == nil || !strings.Contains(err.Error(), "bad") {
		t.Errorf("FromUnstructured of a malformed object: err = %v, want an error naming the pool", err)
	}
}
