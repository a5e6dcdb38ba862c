"""A CIFAR-10 cat detector and tools to see what CNNs see."""

from research import quiet

quiet.install()  # TensorFlow's CPU-machine noise, filtered in one place (research/quiet.py)
