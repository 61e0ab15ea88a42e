#!/usr/bin/env python3
"""Real clients and servers for the end-to-end tests, run inside pods.

grpc-serve / grpc-call use Python grpcio (gRPC's C core), which connects
through AF_INET6 sockets to IPv4-mapped addresses. The socket commands make
the exact connects a test needs. Every client prints one JSON line.
"""
import argparse
import errno
import json
import resource
import socket
import sys
import time

SERVICE = "mesh.test.Echo"


def grpc_serve(args):
    import grpc
    from concurrent import futures

    import random

    def unary(request, context):
        if random.random() * 100 < args.fail_percent:
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing as --fail-percent asks")
        return f"{args.name}:{request.decode()}".encode()

    def stream(requests, context):
        for request in requests:
            yield f"{args.name}:{request.decode()}".encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def grpc_call(args):
    import grpc

    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    out = {}
    try:
        with grpc.insecure_channel(args.addr, options=options) as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            out["unary"] = unary(b"hello", timeout=args.timeout).decode()
            stream = channel.stream_stream(f"/{SERVICE}/Stream")
            messages = (f"m{i}".encode() for i in range(args.messages))
            out["stream"] = [r.decode() for r in stream(messages, timeout=args.timeout)]
        out["ok"] = True
    except grpc.RpcError as e:
        out.update(ok=False, error=f"{e.code()}: {e.details()}")
    print(json.dumps(out), flush=True)


def connect(args):
    family = socket.AF_INET6 if args.family == "6" else socket.AF_INET
    out = {"ok": False}
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    start = time.monotonic()
    try:
        s.connect((args.addr, args.port))
        out["connected"] = True
        if args.payload:
            s.sendall(args.payload.encode())
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            out["reply"] = reply.decode(errors="replace")
        out["ok"] = True
    except OSError as e:
        out["error"] = str(e)
        out["errno"] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "timeout"
    finally:
        # Until the answer or the failure: how long a refusal kept the client waiting.
        out["ms"] = round((time.monotonic() - start) * 1000, 2)
        s.close()
    print(json.dumps(out), flush=True)


def listen(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.addr, args.port))
    s.listen(128)
    s.settimeout(0.2)
    print("ready", flush=True)
    accepted = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            c, _ = s.accept()
            accepted += 1
            c.sendall(b"reached the node\n")
            c.close()
        except socket.timeout:
            pass
    print(json.dumps({"accepted": accepted}), flush=True)


def hold(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, failed = [], 0
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((args.addr, args.port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        held.append(s)
    print(json.dumps({"opened": len(held), "failed": failed}), flush=True)
    time.sleep(args.seconds)
    for s in held:
        s.close()


def linger(args):
    """Connects, reads the server's greeting, prints `ready`, then waits
    (at most --seconds) for the connection to be closed; reports the
    greeting and how long after `ready` it closed (null: it did not)."""
    s = socket.create_connection((args.addr, args.port), timeout=args.seconds)
    greeting = s.recv(4096).decode(errors="replace")
    print("ready", flush=True)
    start = time.monotonic()
    closed = None
    try:
        while time.monotonic() - start < args.seconds:
            s.settimeout(max(0.01, args.seconds - (time.monotonic() - start)))
            if not s.recv(4096):
                closed = time.monotonic() - start
                break
    except socket.timeout:
        pass
    except OSError:
        closed = time.monotonic() - start
    s.close()
    print(json.dumps({"greeting": greeting, "closed_after": closed}), flush=True)


def loop(args):
    """Connects again and again until `seconds` pass; counts the outcomes."""
    ok = failed = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(args.timeout)
        try:
            s.connect((args.addr, args.port))
            s.sendall(b"probe")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            if reply.endswith(b"probe"):
                ok += 1
            else:
                failed += 1
        except OSError:
            failed += 1
        finally:
            s.close()
        time.sleep(args.pause)
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)


def http_requests(args):
    """HTTP/1.1 requests on one keep-alive connection (Python's http.client),
    each {"method", "path", "headers", "body"}; --repeat sends the list that
    many times and reports only counts by answering pod and status."""
    import http.client

    requests = json.loads(args.requests)
    conn = http.client.HTTPConnection(args.addr, args.port, timeout=args.timeout)
    results = []
    pods = {}
    statuses = {}
    for _ in range(args.repeat):
        for r in requests:
            try:
                conn.request(
                    r.get("method", "GET"),
                    r.get("path", "/"),
                    body=r.get("body"),
                    headers=r.get("headers", {}),
                )
                resp = conn.getresponse()
                raw = resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                out = {
                    "status": resp.status,
                    "headers": {k.lower(): v for k, v in resp.getheaders()},
                    "body": body,
                }
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(args.addr, args.port, timeout=args.timeout)
                out = {"status": 0, "error": repr(e), "headers": {}, "body": None}
            if args.repeat > 1:
                pod = out["body"].get("pod") if isinstance(out["body"], dict) else None
                pods[str(pod)] = pods.get(str(pod), 0) + 1
                statuses[str(out["status"])] = statuses.get(str(out["status"]), 0) + 1
            else:
                results.append(out)
    if args.repeat > 1:
        print(json.dumps({"pods": pods, "statuses": statuses}), flush=True)
    else:
        print(json.dumps(results), flush=True)


def http_load(args):
    """--count GET requests of --path with --headers, from --concurrency
    threads, each on its own keep-alive connection (Python's http.client);
    or, with --rate, paced to that many requests per second in total.
    Reports counts by answering pod (x-served-by), status and mesh flags,
    and latency percentiles (ms) by status."""
    import http.client
    import threading
    import time

    headers = json.loads(args.headers)
    lock = threading.Lock()
    pods, statuses, flags, latencies = {}, {}, {}, {}
    issued = [0]
    start = time.monotonic()

    def take():
        with lock:
            if issued[0] >= args.count:
                return None
            issued[0] += 1
            return issued[0] - 1

    def worker():
        conn = None
        while True:
            i = take()
            if i is None:
                break
            if args.rate:
                wait = start + i / args.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            if conn is None:
                conn = http.client.HTTPConnection(args.addr, args.port, timeout=args.timeout)
            t0 = time.monotonic()
            try:
                conn.request("GET", args.path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
                pod = resp.getheader("x-served-by") or "-"
                flag = resp.getheader("x-mesh-flags") or "-"
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                status, pod, flag = "0", "-", "-"
            ms = (time.monotonic() - t0) * 1000.0
            with lock:
                pods[pod] = pods.get(pod, 0) + 1
                statuses[status] = statuses.get(status, 0) + 1
                flags[flag] = flags.get(flag, 0) + 1
                latencies.setdefault(status, []).append(ms)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    latency = {
        s: {"p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs), "over_100": sum(1 for x in xs if x >= 100.0)}
        for s, xs in latencies.items()
    }
    print(
        json.dumps(
            {"pods": pods, "statuses": statuses, "flags": flags, "latency_ms": latency, "seconds": elapsed}
        ),
        flush=True,
    )


def grpc_many(args):
    """--count unary calls of --method on one channel; counts answers by the
    name of the server that gave them, and failures by status code."""
    import grpc

    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    names = {}
    codes = {}
    with grpc.insecure_channel(args.addr, options=options) as channel:
        call = channel.unary_unary(args.method)
        for i in range(args.count):
            try:
                reply = call(b"hi", timeout=args.timeout).decode()
                name = reply.split(":", 1)[0]
                names[name] = names.get(name, 0) + 1
            except grpc.RpcError as e:
                code = str(e.code()).split(".")[-1]
                codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"names": names, "codes": codes}), flush=True)


def ws(args):
    """A WebSocket upgrade by hand: the request, the 101, then raw bytes
    echoed back by the server."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection((args.addr, args.port), timeout=args.timeout)
    s.sendall(
        (
            f"GET /_/ws HTTP/1.1\r\nHost: {args.addr}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
    echo = rest
    if status == 101:
        s.sendall(args.payload.encode())
        while len(echo) < len(args.payload):
            chunk = s.recv(4096)
            if not chunk:
                break
            echo += chunk
    s.close()
    print(json.dumps({"status": status, "echo": echo.decode(errors="replace")}), flush=True)


def banner(args):
    """A server-first exchange: connect, wait for the server's greeting
    (timed), then send a line and read it echoed."""
    s = socket.create_connection((args.addr, args.port), timeout=args.timeout)
    start = time.monotonic()
    greeting = b""
    while not greeting.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        greeting += chunk
    waited = (time.monotonic() - start) * 1000
    s.sendall(b"hello\n")
    s.shutdown(socket.SHUT_WR)
    echo = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        echo += chunk
    s.close()
    print(json.dumps({"greeting": greeting.decode(errors="replace"), "ms": waited, "echo": echo.decode(errors="replace")}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grpc-serve")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--name", required=True)
    g.add_argument("--fail-percent", type=float, default=0)
    g = sub.add_parser("grpc-call")
    g.add_argument("--addr", required=True)
    g.add_argument("--messages", type=int, default=3)
    g.add_argument("--timeout", type=float, default=10)
    g = sub.add_parser("connect")
    g.add_argument("--family", choices=["4", "6"], default="4")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--payload", default="")
    g.add_argument("--timeout", type=float, default=5)
    g = sub.add_parser("listen")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g = sub.add_parser("hold")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g = sub.add_parser("linger")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g = sub.add_parser("loop")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--timeout", type=float, default=1)
    g.add_argument("--pause", type=float, default=0.02)
    g = sub.add_parser("http")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, default=80)
    g.add_argument("--requests", required=True)
    g.add_argument("--repeat", type=int, default=1)
    g.add_argument("--timeout", type=float, default=10)
    g = sub.add_parser("http-load")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, default=80)
    g.add_argument("--path", default="/")
    g.add_argument("--headers", default="{}")
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--concurrency", type=int, default=1)
    g.add_argument("--rate", type=float, default=0)
    g.add_argument("--timeout", type=float, default=10)
    g = sub.add_parser("grpc-many")
    g.add_argument("--addr", required=True)
    g.add_argument("--method", default=f"/{SERVICE}/Unary")
    g.add_argument("--count", type=int, default=10)
    g.add_argument("--timeout", type=float, default=10)
    g = sub.add_parser("banner")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--timeout", type=float, default=10)
    g = sub.add_parser("ws")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, default=80)
    g.add_argument("--payload", required=True)
    g.add_argument("--timeout", type=float, default=10)
    args = p.parse_args()
    {
        "grpc-serve": grpc_serve,
        "grpc-call": grpc_call,
        "connect": connect,
        "listen": listen,
        "hold": hold,
        "linger": linger,
        "loop": loop,
        "http": http_requests,
        "http-load": http_load,
        "grpc-many": grpc_many,
        "ws": ws,
        "banner": banner,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
