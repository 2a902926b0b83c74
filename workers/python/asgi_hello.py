"""An ASGI app for the README's uvicorn recipe: every answer says which
process served it, `Handled by worker <pid>`, the form `herd bench` counts
per pid."""
import os

BODY = f"Handled by worker {os.getpid()}\n".encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
