"""Training: the loop (loop.py) and what it is made of: set-up (build.py), objectives, engines, the
launcher, checkpoints and resumption. `from peftrun.training.loop import train`."""
