#!/usr/bin/env python3
"""A notification receiver for the quickstart: prints each promotion event it gets and
whether its X-Signature verifies with the pipeline's key. Loopback only."""
import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

KEY = Path(__file__).with_name("hmac-key.txt").read_bytes().rstrip(b"\n")
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9099


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        algo, _, digest = self.headers.get("X-Signature", "").partition("=")
        expected = hmac.new(KEY, body, getattr(hashlib, algo or "sha256")).hexdigest()
        verified = hmac.compare_digest(expected, digest)
        event = json.loads(body)
        meta = event.get("metadata", {})
        print(f"[receiver] {event['reason']}: {event['message']} "
              f"(environment={meta.get('environment')}, version={meta.get('version')}, "
              f"signature {'verified' if verified else 'INVALID'})", flush=True)
        self.send_response(204 if verified else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    print(f"[receiver] listening on http://127.0.0.1:{PORT}/", flush=True)
    HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
