"""`mic-diffrep demo`: a Gradio page for a trained classifier folder (or a Hub id)."""

from ..demo import launch_demo


def demo(namespace) -> None:
    launch_demo(namespace.model, host=namespace.host, port=namespace.port, share=namespace.share,
                local_files_only=not namespace.allow_download)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="A demo page for a trained classifier: upload a slice, see its class probabilities and saliency.",
        description="Starts a Gradio app (the same as app.py, which runs unchanged as a Hugging Face Space): upload a "
                    "JPEG/PNG/DICOM/NIfTI slice and see the image the model sees, the class probabilities and an "
                    "occlusion saliency map. Needs `pip install gradio` (or `mic-diffrep[demo]`).")
    parser.add_argument("--model", type=str, required=True, help="Model folder (from probe or run), or a Hub id.")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=7860, help="Port.")
    parser.add_argument("--share", action="store_true", help="Also create a public Gradio share link.")
    parser.add_argument("--allow_download", action="store_true",
                        help="Allow downloading a Hub model that is not in the local cache (offline by default).")
    parser.set_defaults(func=demo)
