# Seed 003 (history:page), Python example; adapted in URL, token, scope, paging while hasMore
# (as the seed's JavaScript example does) and a result dump.
import json
import os

import socketio

SERVER_URL = os.environ["SERVER_URL"]
API_TOKEN = os.environ["API_TOKEN"]
SCOPE_TYPE = os.environ.get("SCOPE_TYPE", "GRAPH")
SCOPE_ID = os.environ["SCOPE_ID"]
LIMIT = int(os.environ.get("LIMIT", "100"))

sio = socketio.Client(reconnection=False)
batches, acks = [], []


def request_history(offset):
    def on_ack(ack):
        print("ACK:", {k: v for k, v in ack.items() if k != "batches"}, len(ack.get("batches", [])), "batches")
        acks.append({k: v for k, v in ack.items() if k != "batches"})
        if not ack.get("ok"):
            sio.disconnect()
            return
        batches.extend(ack.get("batches", []))
        if ack.get("hasMore"):
            request_history(offset + LIMIT)
        else:
            sio.disconnect()

    sio.emit("history:page", {
        "scopeType": SCOPE_TYPE,
        "scopeId": SCOPE_ID,
        "limit": LIMIT,
        "offset": offset
    }, callback=on_ack)


@sio.event
def connect():
    print("connected:", sio.sid)
    request_history(0)


sio.connect(SERVER_URL, headers={"Authorization": f"Bearer {API_TOKEN}"}, transports=["websocket"])
sio.wait()

with open(os.environ["OUT"], "w") as f:
    json.dump({"batches": batches, "acks": acks}, f)
