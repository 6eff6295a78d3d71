package metrics

import (
	"compress/gzip"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// VirtualServerStats are the counters of one of keeplb's virtual servers
// and the Service it forwards.
type VirtualServerStats struct {
	// Service is the Service's "namespace/name".
	Service string
	Key     ipvs.Key
	Stats   ipvs.Stats
}

// ipvsFamilies are the IPVS counters' families: their names, their HELP
// texts (with the stability prefix component-base gives its own metrics,
// so that they read like the rest of /metrics) and their series per
// virtual server.
var ipvsFamilies = [...]struct {
	name, help string
	series     []ipvsSeries
}{
	{namespace + "_ipvs_connections_total",
		"[ALPHA] Connections IPVS scheduled to one of keeplb's virtual servers on this node, since the virtual server was created (64-bit where the kernel has 64-bit counters, Linux 4.1 and later; 32-bit before, where it wraps).",
		[]ipvsSeries{{"", func(s ipvs.Stats) uint64 { return s.Connections }}}},
	{namespace + "_ipvs_packets_total",
		"[ALPHA] Packets through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created (64-bit from Linux 4.1; 32-bit before, where it wraps).",
		[]ipvsSeries{{"in", func(s ipvs.Stats) uint64 { return s.PacketsIn }}, {"out", func(s ipvs.Stats) uint64 { return s.PacketsOut }}}},
	{namespace + "_ipvs_bytes_total",
		"[ALPHA] Bytes through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created.",
		[]ipvsSeries{{"in", func(s ipvs.Stats) uint64 { return s.BytesIn }}, {"out", func(s ipvs.Stats) uint64 { return s.BytesOut }}}},
}

// ipvsSeries is one series of a family per virtual server: its direction
// label ("" for none) and its counter.
type ipvsSeries struct {
	direction string
	value     func(ipvs.Stats) uint64
}

// ipvsStatsText serves the keeplb_ipvs_*_total series as text in the
// Prometheus exposition format, rendered once per read of the kernel's
// counters.
//
// They are read from the kernel when scraped, not at each sync, because
// syncs can be minutes apart (the periodic resync is 5 minutes) and
// counters that stale would make rates useless. But one read is a dump of
// the whole IPVS table with its counters: at 10,000 virtual servers a
// scrape cost 13 s, over Prometheus' 10 s timeout. So a scrape serves the
// last read's text and starts a new read in the background when that one
// is maxAge old: reads run at most one at a time and once per maxAge
// however often anyone scrapes, and only the first scrape waits for one.
// maxAge 0 reads at every scrape.
//
// Why text and not a collector: five series per virtual server are 50,000
// at 10,000 Services. As collected metrics they were kept built between
// reads (36 MB live at that scale) and gathered and encoded again at every
// scrape (about 40 MB of garbage each), most of the speaker's memory at
// scale once it had settled. As text they are about 6 MB, written as they
// are.
type ipvsStatsText struct {
	read   func() []VirtualServerStats
	maxAge time.Duration
	now    func() time.Time

	mu sync.Mutex
	// text is the last read's, rendered; never written to once rendered,
	// since scrapes write it out unlocked. at is when that read started;
	// reading says one is under way.
	text    []byte
	at      time.Time
	reading bool
	// done, for tests, is told when a background read ends.
	done func()
}

func newIPVSStatsText(read func() []VirtualServerStats, maxAge time.Duration) *ipvsStatsText {
	return &ipvsStatsText{read: read, maxAge: maxAge, now: time.Now}
}

// current returns the text to serve: the last read's, starting a new read
// in the background when there is none yet or it is maxAge old; with
// maxAge 0, a read in the caller's time. The first scrape thus serves no
// counters rather than wait for the first read: a dump of 10,000 virtual
// servers takes seconds of CPU under the test VM's emulated CPU, and
// holds the Reconciler's lock, so a scrape that waited for it could wait
// behind a sync too, toward Prometheus' default 10 s timeout, which fails
// the whole scrape.
func (c *ipvsStatsText) current() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	switch {
	case c.maxAge == 0:
		c.text, c.at = renderIPVSStats(c.read(), len(c.text)), now
	case !c.reading && (c.at.IsZero() || now.Sub(c.at) >= c.maxAge):
		c.reading = true
		size := len(c.text)
		go func() {
			text := renderIPVSStats(c.read(), size)
			c.mu.Lock()
			c.text, c.at, c.reading = text, now, false
			done := c.done
			c.mu.Unlock()
			if done != nil {
				done()
			}
		}()
	}
	return c.text
}

// renderIPVSStats writes counters as the three families' text, five lines
// per virtual server, as the registry writes its own: labels in
// alphabetical order (direction, port, protocol, service, vip) and series
// sorted by their values in that order, so that the output is stable and
// reads like the rest of /metrics. sizeHint is the last rendering's
// length, to allocate once.
func renderIPVSStats(stats []VirtualServerStats, sizeHint int) []byte {
	if len(stats) == 0 {
		return nil
	}
	type row struct {
		values [4]string // port, protocol, service, vip
		labels []byte    // port="…",protocol="…",service="…",vip="…"
		s      ipvs.Stats
	}
	rows := make([]row, len(stats))
	for i, s := range stats {
		r := &rows[i]
		r.values = [4]string{strconv.Itoa(int(s.Key.Port)), s.Key.Protocol, s.Service, s.Key.Address.String()}
		r.s = s.Stats
	}
	slices.SortFunc(rows, func(a, b row) int { return slices.Compare(a.values[:], b.values[:]) })
	for i := range rows {
		r := &rows[i]
		for j, name := range [4]string{"port", "protocol", "service", "vip"} {
			if j > 0 {
				r.labels = append(r.labels, ',')
			}
			r.labels = appendLabel(r.labels, name, r.values[j])
		}
	}
	b := make([]byte, 0, max(sizeHint, 1024))
	line := func(name, direction string, labels []byte, v uint64) {
		b = append(b, name...)
		b = append(b, '{')
		if direction != "" {
			b = append(b, `direction="`...)
			b = append(b, direction...)
			b = append(b, `",`...)
		}
		b = append(b, labels...)
		b = append(b, "} "...)
		b = strconv.AppendUint(b, v, 10)
		b = append(b, '\n')
	}
	for _, f := range ipvsFamilies {
		b = append(b, "# HELP "...)
		b = append(b, f.name...)
		b = append(b, ' ')
		b = append(b, f.help...)
		b = append(b, "\n# TYPE "...)
		b = append(b, f.name...)
		b = append(b, " counter\n"...)
		for _, s := range f.series {
			for _, r := range rows {
				line(f.name, s.direction, r.labels, s.value(r.s))
			}
		}
	}
	return b
}

// appendLabel appends name="value", value escaped as the text format
// requires (backslash, double quote and newline).
func appendLabel(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, `="`...)
	for i := range len(value) {
		switch c := value[i]; c {
		case '\\':
			b = append(b, `\\`...)
		case '"':
			b = append(b, `\"`...)
		case '\n':
			b = append(b, `\n`...)
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// IPVSStats says how the per-virtual-server counters are served (see
// RegisterIPVSStats). The zero value serves them, read at every scrape.
type IPVSStats struct {
	// Off serves none: five series per virtual server on every member node
	// add up (50,000 per node at 10,000 Services).
	Off bool
	// MaxAge is how old the counters served may be; 0 reads them at every
	// scrape.
	MaxAge time.Duration
}

// RegisterIPVSStats serves keeplb_ipvs_connections_total,
// keeplb_ipvs_packets_total{direction} and keeplb_ipvs_bytes_total{direction},
// labelled by service, vip, port and protocol, from what read returns, as
// m.IPVSStats says. read must be safe to call concurrently with everything
// else. Call it once, with RegisterIPVS, before Handler.
func (m *Speaker) RegisterIPVSStats(read func() []VirtualServerStats) {
	if m.IPVSStats.Off {
		return
	}
	m.ipvsStats = newIPVSStatsText(read, m.IPVSStats.MaxAge)
}

// serveWithIPVSStats serves what g gathers followed by the IPVS counters'
// text, always in the text format (which every Prometheus accepts),
// gzipped when the client accepts it.
func serveWithIPVSStats(g prometheus.Gatherer, stats *ipvsStatsText) http.Handler {
	format := expfmt.NewFormat(expfmt.TypeTextPlain)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mfs, err := g.Gather()
		if err != nil {
			// As promhttp's default (HTTPErrorOnError) does.
			http.Error(w, "An error has occurred while gathering metrics:\n\n"+err.Error(), http.StatusInternalServerError)
			return
		}
		text := stats.current()
		w.Header().Set("Content-Type", string(format))
		var out io.Writer = w
		if acceptsGzip(r) {
			w.Header().Set("Content-Encoding", "gzip")
			w.Header().Add("Vary", "Accept-Encoding")
			gz := gzip.NewWriter(w)
			defer func() { _ = gz.Close() }() // a client gone away is not ours to report
			out = gz
		}
		enc := expfmt.NewEncoder(out, format)
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				return // the client went away; nothing to tell it
			}
		}
		_, _ = out.Write(text)
	})
}

// acceptsGzip says whether r's Accept-Encoding lists gzip without q=0.
func acceptsGzip(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept-Encoding") {
		for part := range strings.SplitSeq(v, ",") {
			coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
			if strings.EqualFold(strings.TrimSpace(coding), "gzip") && strings.ReplaceAll(params, " ", "") != "q=0" {
				return true
			}
		}
	}
	return false
}
