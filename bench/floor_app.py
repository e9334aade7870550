"""The floor for bench/upload.py: a bare endpoint on the same stack (gunicorn + Bottle) that
only parses the JSON body and fsync-writes it to a new file."""

import os
import uuid

import orjson
from bottle import Bottle, HTTPResponse, request

FOLDER = os.environ.get("FLOOR_DIR", "/tmp/workbench-floor")
os.makedirs(FOLDER, exist_ok=True)

app = Bottle()


@app.post("/")
def write():
    body = request.environ["wsgi.input"].read(int(request.environ.get("CONTENT_LENGTH") or 0))
    records = orjson.loads(body)
    fd = os.open(
        os.path.join(FOLDER, uuid.uuid4().hex + ".json"),
        os.O_WRONLY | os.O_CREAT | os.O_EXCL,
        0o640,
    )
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    return HTTPResponse(
        orjson.dumps({"ok": True, "records": len(records)}),
        status=200,
        headers={"Content-Type": "application/json"},
    )
