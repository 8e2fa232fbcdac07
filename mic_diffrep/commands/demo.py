"""`mic-diffrep demo`: a Gradio page for a trained classifier folder (or a Hub id)."""

import errno
import socket

from ..demo import launch_demo


def _check_port(host: str, port: int) -> None:
    """A port out of range or taken, or a host that is not an address of this machine, fails at once, naming the
    flag, rather than after the model is loaded."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}.")
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as error:
        raise ValueError(f"--host {host} cannot be resolved ({getattr(error, 'strerror', None) or error}).") from None
    with socket.socket(address[0], socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address[4])
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise ValueError(f"--host {host} is not an address of this machine ({error.strerror}); serve on "
                                 f"127.0.0.1 or 0.0.0.0.") from None
            raise ValueError(f"--port {port} on {host} cannot be used ({error.strerror or error}); pick another "
                             f"with --port.") from None


def demo(namespace) -> None:
    _check_port(namespace.host, namespace.port)
    launch_demo(namespace.model, host=namespace.host, port=namespace.port, share=namespace.share,
                local_files_only=not namespace.allow_download, revision=namespace.revision)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="A demo page for a trained classifier: upload a slice, see its class probabilities and saliency.",
        description="Starts a Gradio app (the same as app.py, which runs unchanged as a Hugging Face Space): upload a "
                    "JPEG/PNG/DICOM/NIfTI slice and see the image the model sees, the class probabilities and an "
                    "occlusion saliency map. Needs `pip install gradio` (or `mic-diffrep[demo]`).")
    parser.add_argument("--model", type=str, required=True, help="Model folder (from probe or run), or a Hub id.")
    parser.add_argument("--revision", type=str, default=None,
                        help="The revision (branch, tag or commit) of --model when it is a Hub id (default: main).")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=7860, help="Port.")
    parser.add_argument("--share", action="store_true", help="Also create a public Gradio share link.")
    parser.add_argument("--allow_download", action="store_true",
                        help="Allow downloading a Hub model that is not in the local cache (offline by default).")
    parser.set_defaults(func=demo)
