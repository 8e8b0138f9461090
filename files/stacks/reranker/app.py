"""The rehearsal stack's service: a small real HTTP service that takes its ML libraries from the
mounted env (/root/.local) and its model from the mounted HF cache, offline.

GET /health          env id, model id and commit, Python version
GET /tokenize?text=  the model's tokenizer applied to the text (real work with the mounted model)
"""

import json
import os
import platform
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from huggingface_hub import snapshot_download  # from the mounted env
from tokenizers import Tokenizer  # from the mounted env

MODEL = os.environ["RERANKING_MODEL"]
REVISION = os.environ["RERANKING_MODEL_REVISION"]
ENV_INFO = json.load(open("/root/.local/.mlstack-env.json"))
SNAPSHOT = snapshot_download(MODEL, revision=REVISION)  # HF_HUB_OFFLINE=1: the mounted cache or nothing
TOKENIZER = Tokenizer.from_file(os.path.join(SNAPSHOT, "tokenizer.json"))
TOKENIZER.no_padding()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/health":
            self.reply(200, {"status": "ok", "env_id": ENV_INFO["env_id"], "model": MODEL,
                             "commit": os.path.basename(SNAPSHOT), "python": platform.python_version()})
        elif url.path == "/tokenize":
            text = parse_qs(url.query).get("text", [""])[0]
            encoding = TOKENIZER.encode(text)
            self.reply(200, {"model": MODEL, "ids": encoding.ids, "tokens": encoding.tokens})
        else:
            self.reply(404, {"error": f"no route {url.path}"})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        print(f"{self.address_string()} {format % args}", flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print(f"reranker: {MODEL}@{os.path.basename(SNAPSHOT)} from env {ENV_INFO['env_id']} on :{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
