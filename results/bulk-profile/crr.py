#!/usr/bin/env python3
"""Connection churn like the bench's tcp_crr (connect, 1-byte request/response, client closes
first), N client threads for SECONDS. Run the server side with `crr.py serve`, the client
side with `crr.py SECONDS N` (in the pod). Prints connections made."""
import socket, sys, threading, time
if sys.argv[1] == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("192.0.2.20", 7000)); s.listen(4096)
    def serve(c):
        try:
            if c.recv(1): c.send(b"y")
            c.recv(1)
        finally:
            c.close()
    while True:
        c, _ = s.accept(); serve(c)
else:
    secs, n = float(sys.argv[1]), int(sys.argv[2])
    count = [0] * n; end = time.time() + secs
    def loop(i):
        while time.time() < end:
            c = socket.create_connection(("192.0.2.20", 7000))
            c.send(b"x"); c.recv(1); c.close(); count[i] += 1
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(sum(count))
