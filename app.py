"""Hugging Face Space entry point: the MicDiffRep demo page (`mic_diffrep.demo`) for one trained classifier.

As a Space (SDK: gradio): put this file at the root of the Space with a `requirements.txt` holding `mic-diffrep`,
and either a `model/` folder written by `mic-diffrep probe` / `run` next to it, or the variable `MIC_DIFFREP_MODEL`
set (Space settings) to another folder or a Hub model id. Locally: `MIC_DIFFREP_MODEL=runs/probe python app.py`.
A Hub id that is not in the local cache is downloaded.
"""

import os

from mic_diffrep.demo import build_demo


MODEL = os.environ.get("MIC_DIFFREP_MODEL", os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))

demo = build_demo(MODEL, local_files_only=os.path.isdir(MODEL))

if __name__ == "__main__":
    demo.launch()
