# Six graph:get calls in a row on one connection (seed 001 documents 5 per 10 s per user);
# records every ack with the time it came back.
import json
import os
import time

import socketio

SERVER_URL = os.environ["SERVER_URL"]
API_TOKEN = os.environ["API_TOKEN"]

sio = socketio.Client()
sio.connect(
    SERVER_URL,
    headers={"Authorization": f"Bearer {API_TOKEN}"},
    transports=["websocket"],
    wait_timeout=10,
)
start = time.time()
acks = []
for i in range(6):
    ack = sio.call("graph:get", {"limit": 1, "offset": 0}, timeout=10)
    acks.append({"elapsed": time.time() - start, "ok": ack.get("ok"), "error": ack.get("error"),
                 "message": ack.get("message"), "trace_id": ack.get("trace_id")})
sio.disconnect()

with open(os.environ["OUT"], "w") as f:
    json.dump({"acks": acks}, f)
