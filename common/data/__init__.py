"""Data specs (synthetic, CIFAR, MNIST, image folders): read by the device client and by training alike."""
