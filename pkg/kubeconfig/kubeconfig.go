// Package kubeconfig finds the REST config keeplb's commands connect with,
// so that the controller, the speaker and the CLI subcommands look for it in
// the same places and in the same order as kubectl.
package kubeconfig

import (
	"errors"
	"fmt"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Usage is the help text of a --kubeconfig flag whose value is passed to
// Load, so that every command states the same order.
const Usage = "Path to a kubeconfig file. Empty uses $KUBECONFIG, ~/.kube/config, then the in-cluster service account."

// Load returns the REST config to connect with. A non-empty path is the
// kubeconfig file to use, and must exist. An empty path uses client-go's
// default loading rules, as kubectl does: the files $KUBECONFIG lists,
// merged (the first to set a value wins); when $KUBECONFIG is unset or
// empty, ~/.kube/config; when that finds no configuration, the in-cluster
// service account. A pod usually has neither $KUBECONFIG nor
// ~/.kube/config, and so gets its service account.
func Load(path string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil && clientcmd.IsEmptyConfig(err) {
		// client-go's message suggests KUBERNETES_MASTER, which is not
		// looked at: say where Load looked instead.
		return nil, errors.New(noConfig(path))
	}
	return cfg, err
}

// noConfig explains an empty configuration found from path.
func noConfig(path string) string {
	const inCluster = "there is no in-cluster service account (KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT or the token in /var/run/secrets/kubernetes.io/serviceaccount missing)"
	if path != "" {
		return fmt.Sprintf("no configuration: %s selects no cluster, and %s", path, inCluster)
	}
	return "no configuration: no kubeconfig path given, no file in $KUBECONFIG (or ~/.kube/config when it is unset) selects a cluster, and " + inCluster
}
