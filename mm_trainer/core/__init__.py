"""The trainer-independent run: the parts mm-trainer adds to a training run, built from explicit inputs."""
