"""Real parts for tests, the demo and the benchmark: registry, images, containerd, netns."""
