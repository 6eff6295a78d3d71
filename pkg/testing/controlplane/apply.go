package controlplane

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

// applyFieldManager owns the fields written by Apply.
const applyFieldManager = "keeplb-test"

// How long Apply waits for a kind to show up in discovery and for a CRD to
// become Established. Both normally take well under a second.
const (
	mappingTimeout     = 15 * time.Second
	establishedTimeout = 30 * time.Second
)

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// Apply server-side applies (field manager "keeplb-test", forced) every
// object of the given multi-document YAML files, in order, as admin.
// Namespaced objects without a namespace go to "default". After applying a
// CustomResourceDefinition it waits until the CRD is Established, so that
// custom resources further down the same files can be applied. All files are
// parsed before anything is applied, so a syntax error changes nothing.
func (c *ControlPlane) Apply(ctx context.Context, yamlFiles ...string) error {
	type fileObject struct {
		file string
		obj  *unstructured.Unstructured
	}
	var objs []fileObject
	for _, file := range yamlFiles {
		fileObjs, err := readObjects(file)
		if err != nil {
			return fmt.Errorf("apply: %w", err)
		}
		for _, obj := range fileObjs {
			objs = append(objs, fileObject{file, obj})
		}
	}

	cfg := c.AdminConfig()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply: dynamic client: %w", err)
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply: discovery client: %w", err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapperWithContext(
		memory.NewMemCacheClientWithContext(discovery.ToDiscoveryInterfaceWithContext(disco)))

	for _, o := range objs {
		if err := applyObject(ctx, dyn, mapper, o.obj); err != nil {
			return fmt.Errorf("apply %s: %s %s: %w", o.file, o.obj.GetKind(), objectName(o.obj), err)
		}
	}
	return nil
}

// readObjects decodes every non-empty document of a YAML (or JSON) file,
// flattening v1 Lists into their items.
func readObjects(file string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()

	var objs []*unstructured.Unstructured
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	for doc := 1; ; doc++ {
		data, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, doc, err)
		}
		js, err := utilyaml.ToJSON(data)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, doc, err)
		}
		if string(js) == "null" {
			continue // empty document, or only comments
		}
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, doc, err)
		}
		if !obj.IsList() {
			objs = append(objs, obj)
			continue
		}
		err = obj.EachListItem(func(item runtime.Object) error {
			u, ok := item.(*unstructured.Unstructured)
			if !ok {
				return fmt.Errorf("unexpected list item type %T", item)
			}
			objs = append(objs, u)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, doc, err)
		}
	}
}

// applyObject applies one object and, for a CRD, waits until it is served.
func applyObject(ctx context.Context, dyn dynamic.Interface, mapper *restmapper.DeferredDiscoveryRESTMapper, obj *unstructured.Unstructured) error {
	if obj.GetName() == "" {
		return errors.New("server-side apply needs metadata.name")
	}
	gvk := obj.GroupVersionKind()
	mapping, err := restMapping(ctx, mapper, gvk)
	if err != nil {
		return err
	}

	var ri dynamic.ResourceInterface
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			obj.SetNamespace(metav1.NamespaceDefault)
		}
		ri = dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
	} else {
		obj.SetNamespace("")
		ri = dyn.Resource(mapping.Resource)
	}
	if _, err := ri.Apply(ctx, obj.GetName(), obj, metav1.ApplyOptions{FieldManager: applyFieldManager, Force: true}); err != nil {
		return err
	}

	if mapping.Resource.GroupResource() == crdGVR.GroupResource() {
		if err := waitEstablished(ctx, dyn, obj.GetName()); err != nil {
			return err
		}
		// The new kind is certainly not in the cached discovery yet.
		mapper.ResetWithContext(ctx)
	}
	return nil
}

// restMapping resolves gvk, refreshing discovery for a while when the kind is
// unknown: a CRD applied a moment ago (here or by a test) takes a little
// time to appear in discovery.
func restMapping(ctx context.Context, mapper *restmapper.DeferredDiscoveryRESTMapper, gvk schema.GroupVersionKind) (*meta.RESTMapping, error) {
	ctx, cancel := context.WithTimeout(ctx, mappingTimeout)
	defer cancel()
	for {
		mapping, err := mapper.RESTMappingWithContext(ctx, gvk.GroupKind(), gvk.Version)
		if err == nil {
			return mapping, nil
		}
		if !meta.IsNoMatchError(err) {
			return nil, fmt.Errorf("map %s: %w", gvk, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("map %s: %w", gvk, err)
		case <-time.After(200 * time.Millisecond):
		}
		mapper.ResetWithContext(ctx)
	}
}

// waitEstablished waits until the named CRD has condition Established=True,
// failing early if its names were rejected (which never resolves by itself).
func waitEstablished(ctx context.Context, dyn dynamic.Interface, name string) error {
	ctx, cancel := context.WithTimeout(ctx, establishedTimeout)
	defer cancel()
	for {
		crd, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
			for _, c := range conds {
				cond, _ := c.(map[string]any)
				switch {
				case cond["type"] == "Established" && cond["status"] == "True":
					return nil
				case cond["type"] == "NamesAccepted" && cond["status"] == "False":
					return fmt.Errorf("CRD names not accepted: %v", cond["message"])
				}
			}
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = errors.New("not Established")
			}
			//nolint:errorlint // both wrapped: callers test for the deadline as for the last error
			return fmt.Errorf("wait for CRD %s: %w (%w)", name, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// objectName is "namespace/name" or "name", for error messages.
func objectName(obj *unstructured.Unstructured) string {
	if ns := obj.GetNamespace(); ns != "" {
		return ns + "/" + obj.GetName()
	}
	return obj.GetName()
}
