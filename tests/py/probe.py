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

    def unary(request, context):
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
    try:
        s.connect((args.addr, args.port))
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


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grpc-serve")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--name", required=True)
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
    g = sub.add_parser("loop")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--timeout", type=float, default=1)
    g.add_argument("--pause", type=float, default=0.02)
    args = p.parse_args()
    {
        "grpc-serve": grpc_serve,
        "grpc-call": grpc_call,
        "connect": connect,
        "listen": listen,
        "hold": hold,
        "loop": loop,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
