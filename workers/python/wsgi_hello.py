"""A WSGI app for the README's recipes (gunicorn, uWSGI under herd): every
answer says which process served it, `Handled by worker <pid>`, the form
`herd bench` counts per pid."""
import os


def app(environ, start_response):
    body = f"Handled by worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
