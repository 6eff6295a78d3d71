// Package status builds and renders the report of `keeplb status`: the
// IPPools with their counts and conditions, and keeplb's Services with their
// VIPs, pool, holder node, forwarding mode and, for pending ones, the last
// warning. Rendering is pure; Collect is a thin read layer over the API.
package status

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode/utf8"
)

// Report is everything `keeplb status` shows.
type Report struct {
	Pools    []Pool    `json:"pools"`
	Services []Service `json:"services"`
}

// Pool is one IPPool as its status reports it.
type Pool struct {
	Name      string   `json:"name"`
	Addresses []string `json:"addresses"`
	// Total and Free are decimal strings: IPv6 pools can exceed 2^63.
	Total      string `json:"total"`
	Used       int64  `json:"used"`
	Free       string `json:"free"`
	OutOfRange int64  `json:"outOfRange"`
	// Ready and Conflicting are the conditions, empty when not set yet.
	Ready       Condition `json:"ready"`
	Conflicting Condition `json:"conflicting"`
}

// Condition is the part of a pool condition worth a column.
type Condition struct {
	// Status is True, False or Unknown; empty when the condition is absent.
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
}

// Service is one of keeplb's Services.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// VIPs are the addresses of status.loadBalancer.ingress; none while
	// the Service is pending.
	VIPs []VIP `json:"vips"`
	// Pools are the IPPools containing the VIPs, without repeats; empty for
	// an address in no pool.
	Pools []string `json:"pools"`
	// Holder is the node holding the VIPs (annotation keeplb.io/holder):
	// its name when one node holds every VIP, else each VIP's holder in
	// the order of VIPs, "-" for a VIP with none recorded.
	Holder string `json:"holder,omitempty"`
	// Forwarding is the forwarding mode: annotation, pool default, nodeport.
	Forwarding string `json:"forwarding"`
	// Problem is, for a pending Service, the message of its most recent
	// Warning event.
	Problem string `json:"problem,omitempty"`
}

// VIP is one ingress address, its ipMode and the node holding it.
type VIP struct {
	IP     string `json:"ip"`
	IPMode string `json:"ipMode,omitempty"`
	// Holder is the node the keeplb.io/holder annotation names for this
	// VIP; empty when none is recorded.
	Holder string `json:"holder,omitempty"`
}

// Pending reports whether the Service has no address yet.
func (s *Service) Pending() bool { return len(s.VIPs) == 0 }

// MaxProblem is how many characters of a problem the text output shows; the
// JSON output keeps it whole.
const MaxProblem = 100

// none stands for an empty cell.
const none = "-"

// WriteJSON writes r as indented JSON. Strings keep every character, as
// JSON escapes: a script reads exactly what the cluster holds, and a
// terminal the JSON is printed on receives no control character.
func WriteJSON(w io.Writer, r Report) error {
	if r.Pools == nil {
		r.Pools = []Pool{}
	}
	if r.Services == nil {
		r.Services = []Service{}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return err
	}
	_, err := w.Write(escapeJSONControls(buf.Bytes()))
	return err
}

// WriteText writes r as two tables with aligned columns, POOLS then
// SERVICES. Every cell goes through Printable: the report carries strings
// tenants wrote, and text output goes to a terminal.
//
// The writes into a tabwriter keep their errors to themselves: a w that
// fails them fails the Flush after them too, and that error is returned.
func WriteText(w io.Writer, r Report) error {
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	_, _ = fmt.Fprintln(tw, "POOLS")
	if len(r.Pools) == 0 {
		_, _ = fmt.Fprintln(tw, "No IPPools.")
	} else {
		_, _ = fmt.Fprintln(tw, "NAME\tADDRESSES\tTOTAL\tUSED\tFREE\tOUT-OF-RANGE\tREADY\tCONFLICTING")
		for _, p := range r.Pools {
			row(tw, p.Name, strings.Join(p.Addresses, ","), p.Total, strconv.FormatInt(p.Used, 10), p.Free,
				strconv.FormatInt(p.OutOfRange, 10), p.Ready.text("True"), p.Conflicting.text("False"))
		}
	}
	_, _ = fmt.Fprintln(tw)
	// A table of its own: the pool columns must not widen these.
	if err := tw.Flush(); err != nil {
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	_, _ = fmt.Fprintln(tw, "SERVICES")
	if len(r.Services) == 0 {
		_, _ = fmt.Fprintln(tw, "No LoadBalancer Services of keeplb.")
		return tw.Flush()
	}
	_, _ = fmt.Fprintln(tw, "SERVICE\tVIPS\tPOOL\tHOLDER\tFORWARDING\tPROBLEM")
	for _, s := range r.Services {
		vips := "<pending>"
		if !s.Pending() {
			parts := make([]string, 0, len(s.VIPs))
			for _, v := range s.VIPs {
				if v.IPMode != "" {
					parts = append(parts, v.IP+"("+v.IPMode+")")
				} else {
					parts = append(parts, v.IP)
				}
			}
			vips = strings.Join(parts, ",")
		}
		row(tw, s.Namespace+"/"+s.Name, vips, strings.Join(s.Pools, ","), s.Holder,
			s.Forwarding, Truncate(s.Problem, MaxProblem))
	}
	return tw.Flush()
}

// text renders a condition as its status, with the reason when the status
// is not the healthy one.
func (c Condition) text(healthy string) string {
	switch {
	case c.Status == "":
		return none
	case c.Status == healthy || c.Reason == "":
		return c.Status
	}
	return c.Status + "(" + c.Reason + ")"
}

// Truncate folds s onto one line (a tab or newline would break the table)
// and cuts it to at most n characters, ending with "..." when cut.
func Truncate(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	const ellipsis = "..."
	r := []rune(s)
	if n <= len(ellipsis) {
		return string(r[:n])
	}
	return strings.TrimRight(string(r[:n-len(ellipsis)]), " ") + ellipsis
}

// row writes one table row: each cell made printable, "-" for an empty one.
// Printable runs after Truncate, which folds newlines and tabs into spaces
// first; a control character left over is escaped, so no cell can break
// the table or reach the terminal raw.
func row(w io.Writer, cells ...string) {
	for i, c := range cells {
		if i > 0 {
			_, _ = io.WriteString(w, "\t")
		}
		_, _ = io.WriteString(w, orNone(Printable(c)))
	}
	_, _ = io.WriteString(w, "\n")
}

func orNone(s string) string {
	if s == "" {
		return none
	}
	return s
}
