package main

import (
	_ "github.com/spf13/cobra"
	_ "k8s.io/api/core/v1"
	_ "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	_ "k8s.io/client-go/kubernetes"
	_ "k8s.io/cloud-provider/controllers/service"
	_ "k8s.io/component-base/logs"
	_ "k8s.io/component-base/metrics/legacyregistry"
)

func main() {}
