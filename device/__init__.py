"""The device tier: takes raw uint8 images, runs the first segment and exit; ``device.client`` feeds it."""
