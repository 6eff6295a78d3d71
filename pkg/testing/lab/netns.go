package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keeplb/keeplb/pkg/nsthread"
)

// Do runs f on an OS thread inside the named namespace ns (package
// nsthread): sockets f opens belong to ns for their whole life, commands
// it starts run in ns.
func Do(ns string, f func() error) error { return nsthread.Do(nsthread.Path(ns), f) }

func writeSysctl(k, v string) error {
	return os.WriteFile("/proc/sys/"+strings.ReplaceAll(k, ".", "/"), []byte(v), 0o644)
}

// Server is a responder started by Serve.
type Server struct {
	tcp net.Listener
	udp net.PacketConn
	wg  sync.WaitGroup
}

// Close stops the server; connections being served finish.
func (s *Server) Close() {
	if s.tcp != nil {
		_ = s.tcp.Close()
	}
	if s.udp != nil {
		_ = s.udp.Close()
	}
	s.wg.Wait()
}

// Serve answers, inside namespace ns on addr, every HTTP request over TCP
// and every UDP datagram with one line: "NAME from=CLIENT_IP:PORT". An
// HTTP request for /slow?ms=N waits N milliseconds before answering, to
// hold a connection open.
func Serve(ns string, addr netip.AddrPort, name string) (*Server, error) {
	s := &Server{}
	err := Do(ns, func() error {
		var err error
		if s.tcp, err = net.Listen("tcp", addr.String()); err != nil {
			return err
		}
		if s.udp, err = net.ListenPacket("udp", addr.String()); err != nil {
			_ = s.tcp.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("serve %s in %s: %w", addr, ns, err)
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.tcp.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				answerHTTP(c, name)
			}()
		}
	}()
	go func() {
		defer s.wg.Done()
		buf := make([]byte, 1500)
		for {
			_, from, err := s.udp.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = s.udp.WriteTo([]byte(name+" from="+from.String()+"\n"), from)
		}
	}()
	return s, nil
}

func answerHTTP(c net.Conn, name string) {
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	if f := strings.Fields(line); len(f) >= 2 {
		if ms, ok := strings.CutPrefix(f[1], "/slow?ms="); ok {
			if n, err := strconv.Atoi(ms); err == nil {
				time.Sleep(time.Duration(n) * time.Millisecond)
			}
		}
	}
	body := name + " from=" + c.RemoteAddr().String() + "\n"
	_, _ = fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

// Answer is one responder's answer.
type Answer struct {
	// Name is the responder's name.
	Name string
	// From is the address the responder saw the request come from.
	From netip.AddrPort
}

func parseAnswer(s string) (Answer, error) {
	name, from, ok := strings.Cut(strings.TrimSpace(s), " from=")
	if !ok {
		return Answer{}, fmt.Errorf("not an answer of lab.Serve: %q", s)
	}
	ap, err := netip.ParseAddrPort(from)
	if err != nil {
		return Answer{}, fmt.Errorf("not an answer of lab.Serve: %q", s)
	}
	return Answer{Name: name, From: ap}, nil
}

// Get sends one HTTP/1.0 GET of path to addr from namespace ns, on a new
// connection, and returns the responder's answer. The whole exchange has
// the given timeout.
func Get(ctx context.Context, ns string, addr netip.AddrPort, path string, timeout time.Duration) (Answer, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var c net.Conn
	err := Do(ns, func() error {
		var err error
		d := net.Dialer{}
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return Answer{}, err
	}
	defer func() { _ = c.Close() }()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr); err != nil {
		return Answer{}, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return Answer{}, err
	}
	_, body, ok := strings.Cut(string(b), "\r\n\r\n")
	if !ok || !strings.HasPrefix(string(b), "HTTP/1.0 200") {
		return Answer{}, fmt.Errorf("bad HTTP answer %q", b)
	}
	return parseAnswer(body)
}

// UDPClient is a UDP socket in a namespace with a fixed source port, so
// that its datagrams keep one conntrack and IPVS connection entry.
type UDPClient struct {
	c net.PacketConn
}

// NewUDPClient opens a UDP socket in namespace ns.
func NewUDPClient(ns string) (*UDPClient, error) {
	u := &UDPClient{}
	err := Do(ns, func() error {
		var err error
		u.c, err = net.ListenPacket("udp4", ":0")
		return err
	})
	if err != nil {
		return nil, err
	}
	return u, nil
}

// Close closes the socket.
func (u *UDPClient) Close() { _ = u.c.Close() }

// Query sends one datagram to addr and waits up to timeout for the answer.
func (u *UDPClient) Query(addr netip.AddrPort, timeout time.Duration) (Answer, error) {
	if _, err := u.c.WriteTo([]byte("?"), net.UDPAddrFromAddrPort(addr)); err != nil {
		return Answer{}, err
	}
	_ = u.c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 1500)
	for {
		n, from, err := u.c.ReadFrom(buf)
		if err != nil {
			return Answer{}, err
		}
		// A late answer to an earlier query from another source is not
		// this one's.
		if ua, ok := from.(*net.UDPAddr); ok && ua.AddrPort().Addr().Unmap() == addr.Addr() && ua.Port == int(addr.Port()) {
			return parseAnswer(string(buf[:n]))
		}
	}
}
