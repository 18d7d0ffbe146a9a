#!/usr/bin/env python3
"""An independent client of Cairn's data protocol that tries to get in (no Cairn code).

It knows only the wire format of docs/replica-format.md and a volume id, and tries, against one
replica server: hello, claim (epoch 2^62), read, and write, each on its own connection, as
  --as plain     plain TCP, no credential
  --as tls       TLS 1.3 with --cert/--key (e.g. another cluster's) or with none
  --as replay    the client->server bytes of a recorded session (--replay FILE) sent again
It prints one JSON object per attempt and exits 0 when every attempt was refused, 1 when any
was answered with success (2 on a usage error).

--record FILE --listen PORT --upstream HOST:PORT relays one connection and records what the
client sent (to capture a real session for --as replay).
"""
import argparse
import json
import os
import socket
import ssl
import struct
import sys

MAGIC = 0x464E5243
OPS = {"hello": 1, "claim": 2, "read": 3, "write": 4}


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def frame(op, request_id, epoch, payload, flags=0):
    head = struct.pack("<IHBBQIQ", MAGIC, 1, OPS[op], flags, request_id, len(payload), epoch)
    return head + struct.pack("<I", crc32c(head)) + payload


def volume_field(volume):
    v = volume.encode()
    return struct.pack("<H", len(v)) + v


def requests(volume):
    hello = frame("hello", 1, 0, struct.pack("<HH", 2, 0))
    return {
        "hello": [hello],
        "claim": [hello, frame("claim", 2, 1 << 62, volume_field(volume))],
        "read": [hello, frame("read", 2, 1 << 62, volume_field(volume) + struct.pack("<QI", 0, 4096))],
        "write": [hello, frame("write", 2, 1 << 62, volume_field(volume) + struct.pack("<QQI", 1 << 40, 0, 4096) + b"\xee" * 4096)],
    }


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def read_response(sock):
    head = recv_exact(sock, 32)
    magic, _, op, flags, rid, length, epoch, _ = struct.unpack("<IHBBQIQI", head)
    if magic != MAGIC:
        raise ConnectionError("not a data-protocol frame")
    payload = recv_exact(sock, length)
    status = payload[0] if payload else 255
    return {"op": op, "status": status, "epoch": epoch}


def connect(args):
    host, port = args.address.rsplit(":", 1)
    raw = socket.create_connection((host.strip("[]"), int(port)), timeout=args.timeout)
    if args.as_ != "tls":
        return raw
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an intruder trusts anything
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx.wrap_socket(raw)


def attempt(args, name, frames):
    result = {"attempt": name, "as": args.as_, "address": args.address}
    try:
        sock = connect(args)
    except (OSError, ssl.SSLError) as e:
        result.update(result="refused", detail="connect/handshake: %s" % e)
        return result
    try:
        if args.as_ == "replay":
            with open(args.replay, "rb") as f:
                sock.sendall(f.read())
        else:
            for f in frames:
                sock.sendall(f)
        answers = []
        expected = 1 if args.as_ == "replay" else len(frames)
        for _ in range(expected):
            answers.append(read_response(sock))
        last = answers[-1]
        result["answers"] = answers
        ok = all(a["status"] == 0 for a in answers)
        result.update(result="accepted" if ok else "refused",
                      detail="status %d" % last["status"])
        if not ok and last["epoch"] not in (0, 1 << 62):
            result["leaked_epoch"] = last["epoch"]
            result["result"] = "leaked"
    except (OSError, ssl.SSLError, ConnectionError, struct.error) as e:
        result.update(result="refused", detail=str(e) or type(e).__name__)
    finally:
        sock.close()
    return result


def record(args):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.listen))
    listener.listen(1)
    print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
    client, _ = listener.accept()
    host, port = args.upstream.rsplit(":", 1)
    upstream = socket.create_connection((host, int(port)))
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ, upstream)
    sel.register(upstream, selectors.EVENT_READ, client)
    with open(args.record, "wb") as out:
        open_ends = 2
        while open_ends:
            for key, _ in sel.select():
                data = key.fileobj.recv(65536)
                if not data:
                    sel.unregister(key.fileobj)
                    key.data.shutdown(socket.SHUT_WR)
                    open_ends -= 1
                    continue
                if key.fileobj is client:
                    out.write(data)
                key.data.sendall(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address")
    p.add_argument("--volume", default="")
    p.add_argument("--as", dest="as_", choices=["plain", "tls", "replay"], default="plain")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--replay")
    p.add_argument("--record")
    p.add_argument("--listen", type=int, default=0)
    p.add_argument("--upstream")
    p.add_argument("--timeout", type=float, default=5)
    args = p.parse_args()
    if args.record:
        record(args)
        return 0
    if not args.address:
        p.error("--address is required")
    attempts = {"replay": {"replay": None}} if args.as_ == "replay" else requests(args.volume)
    bad = False
    for name, frames in attempts.items():
        r = attempt(args, name, frames)
        print(json.dumps(r), flush=True)
        bad |= r["result"] != "refused"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
