"""A CIFAR-10 cat detector and tools to see what CNNs see."""
