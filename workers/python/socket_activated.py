#!/usr/bin/env python3
"""A plain socket-activated HTTP server: no herd code at all, only systemd's
LISTEN_FDS convention (the listening socket is fd 3 when LISTEN_PID is our pid).
It runs unmodified under systemd or under herd's OS-scheduled modes:

    herd run --mode shared --ready-delay 200ms --listen 127.0.0.1:3000 -- python3 workers/python/socket_activated.py
"""
import http.server, os, socket, sys

if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit("socket_activated.py: no LISTEN_FDS socket meant for this process")

class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"Handled by worker {os.getpid()} (LISTEN_PID={os.environ['LISTEN_PID']})".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *_): pass

server = http.server.ThreadingHTTPServer(("", 0), Hello, bind_and_activate=False)
server.socket = socket.socket(fileno=3)  # the inherited listening socket
server.socket.setblocking(True)
server.serve_forever()
