# Seed 002 (branch:get), Python example; adapted in URL, token, root and a result dump only.
import json
import os

import socketio

SERVER_URL = os.environ["SERVER_URL"]
API_TOKEN = os.environ["API_TOKEN"]
ROOT = os.environ["ROOT"]
sio = socketio.Client(logger=False, engineio_logger=False, reconnection=False)
all_nodes, all_links = [], []
limit, offset = int(os.environ.get("LIMIT", "1000")), 0
errors = []


@sio.event
def connect():
    print("connected, sid:", sio.sid)
    request_branch()


def request_branch():
    global offset

    def on_ack(ack):
        global offset
        if not ack.get("ok"):
            print("branch:get error:", ack)
            errors.append(ack)
            sio.disconnect()
            return
        nodes = ack.get("nodes", [])
        links = ack.get("links", [])
        all_nodes.extend(nodes)
        all_links.extend(links)
        print(f"chunk: +{len(nodes)} nodes (offset={offset})")
        if ack.get("hasMore"):
            offset += limit
            sio.emit("branch:get", {"root": ROOT, "limit": limit, "offset": offset}, callback=on_ack)
        else:
            print("done:", len(all_nodes), "nodes")
            sio.disconnect()

    sio.emit("branch:get", {"root": ROOT, "limit": limit, "offset": offset}, callback=on_ack)


@sio.event
def disconnect():
    print("disconnected")


sio.connect(
    SERVER_URL,
    headers={"Authorization": f"Bearer {API_TOKEN}"},
    transports=["websocket"],
    wait_timeout=10,
)
sio.wait()

with open(os.environ["OUT"], "w") as f:
    json.dump({"nodes": all_nodes, "links": all_links, "pages": offset // limit + 1, "errors": errors}, f)
