"""What crosses a link: tensors as raw bytes, link codecs, request/reply messages, and the link's own arithmetic."""
