"""Stand-ins for unit tests of the data path."""


class FakeTap:
    """Records the frames written to it, like a tap with offloads off."""

    name = "fake0"
    mtu = 1500
    offload = False

    def __init__(self):
        self.written = []

    def write(self, frame):
        self.written.append(frame)

    def read(self):
        return None  # nothing ready
