"""`python -m mic_diffrep ...`: the `mic-diffrep` command (e.g. under `torchrun -m mic_diffrep run ...`)."""

from mic_diffrep.commands import console_main


if __name__ == "__main__":
    console_main()
