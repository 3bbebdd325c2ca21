"""A uvicorn server on a free localhost port in a thread, as `mixattn serve`
runs one: for the tests that talk to the server over HTTP (the openai
client, lm-eval, benchmarks/serve_load.py)."""

import json
import threading
import time
import urllib.request

import uvicorn


class ThreadedServer:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def get(self, path):
        with urllib.request.urlopen(self.url + path) as r:
            return json.loads(r.read())
