# Seed 000 (connect) Python example with a wrong token; records what the server answers.
import json
import os
import time

import socketio

SERVER_URL = os.environ["SERVER_URL"]
API_TOKEN = os.environ["API_TOKEN"]

# No automatic reconnection: the script observes one refusal.
sio = socketio.Client(reconnection=False)
seen = {"connected": [], "disconnect_reasons": [], "connect_errors": []}


@sio.on("connected")
def on_connected(data):
    seen["connected"].append(data)


@sio.event
def connect_error(e):
    seen["connect_errors"].append(str(e))


@sio.event
def disconnect(reason=None):
    seen["disconnect_reasons"].append(str(reason))


try:
    sio.connect(
        SERVER_URL,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        transports=["websocket"]
    )
except Exception as e:  # a refused handshake is an answer too
    seen["connect_errors"].append(repr(e))

deadline = time.time() + 5
while time.time() < deadline and not seen["disconnect_reasons"] and not seen["connect_errors"]:
    time.sleep(0.05)

with open(os.environ["OUT"], "w") as f:
    json.dump(seen, f)
