package vrrp

import "sigs.k8s.io/yaml"

func yamlInto(s string, out *map[string]any) error { return yaml.Unmarshal([]byte(s), out) }
