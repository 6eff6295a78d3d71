package speaker

import (
	"maps"
	"testing"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

func TestApplyEvent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		before map[string]keepalived.State
		ev     keepalived.Event
		want   map[string]keepalived.State
	}{
		{"new instance", map[string]keepalived.State{}, keepalived.Event{Instance: "a", State: keepalived.StateBackup}, map[string]keepalived.State{"a": keepalived.StateBackup}},
		{"to master", map[string]keepalived.State{"a": keepalived.StateBackup}, keepalived.Event{Instance: "a", State: keepalived.StateMaster}, map[string]keepalived.State{"a": keepalived.StateMaster}},
		{"master seeing a lower priority stays master", map[string]keepalived.State{"a": keepalived.StateMaster}, keepalived.Event{Instance: "a", State: keepalived.StateMasterRxLowerPri}, map[string]keepalived.State{"a": keepalived.StateMaster}},
		{"fault", map[string]keepalived.State{"a": keepalived.StateMaster}, keepalived.Event{Instance: "a", State: keepalived.StateFault}, map[string]keepalived.State{"a": keepalived.StateFault}},
		{"deleted", map[string]keepalived.State{"a": keepalived.StateMaster, "b": keepalived.StateBackup}, keepalived.Event{Instance: "a", State: keepalived.StateDeleted}, map[string]keepalived.State{"b": keepalived.StateBackup}},
		{"stop", map[string]keepalived.State{"a": keepalived.StateMaster}, keepalived.Event{Instance: "a", State: keepalived.StateStop}, map[string]keepalived.State{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := maps.Clone(tc.before)
			applyEvent(got, tc.ev)
			if !maps.Equal(got, tc.want) {
				t.Errorf("after %v: %v; want %v", tc.ev, got, tc.want)
			}
		})
	}
}
