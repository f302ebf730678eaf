"""The tap device: the one place gelf touches the kernel's Ethernet side.

Made and configured with python-pytun. Every failure a user can cause (not root, no
/dev/net/tun, name taken, MTU refused) becomes a TapError with a one-line explanation.
"""

import errno
import fcntl
import ipaddress
import os
import subprocess

import pytun

MIN_MTU = 68
MAX_MTU = 65535
# Room for the Ethernet header and one 802.1Q tag on top of the MTU.
FRAME_OVERHEAD = 18

# The one ioctl python-pytun lacks: <linux/if_tun.h> TUNSETOFFLOAD = _IOW('T', 208, unsigned int),
# and the offloads gelf accepts: checksums left partial, TCP super-frames (IPv4, IPv6, ECN).
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
VNET_HDR_SIZE = 10
SUPER_FRAME = 65535 + FRAME_OVERHEAD  # the largest frame a TSO tap hands over


class TapError(Exception):
    """A tap that cannot be made or configured, explained for the user."""


def _explain(err, name):
    code = err.args[0] if err.args and isinstance(err.args[0], int) else None
    if code == errno.ENOENT:
        return "/dev/net/tun not found: load the tun module (modprobe tun)"
    if code in (errno.EPERM, errno.EACCES):
        return "permission denied creating a tap: run gelf as root (or with CAP_NET_ADMIN)"
    if code == errno.EBUSY:
        return "interface %s is already in use" % name
    if code == errno.EINVAL:
        return "cannot create tap %s: the kernel refused the name" % name
    return "cannot create tap %s: %s" % (name, err.args[-1] if err.args else err)


def check_cidr(cidr):
    """`cidr` if it is ADDRESS/PREFIX (IPv4 or IPv6), else TapError: an address without its
    prefix length would silently become a /32 or /128, a subnet of one."""
    try:
        address = ipaddress.ip_interface(cidr)
    except ValueError:
        raise TapError("invalid address %r: give it as ADDRESS/PREFIX, e.g. 10.0.0.1/24" % cidr) from None
    if "/" not in cidr:
        raise TapError("address %s has no prefix length: give it as ADDRESS/PREFIX, e.g. %s/%d"
                       % (cidr, cidr, 24 if address.version == 4 else 64))
    return cidr


def check_bridge(bridge):
    """TapError unless `bridge` is an existing Linux bridge."""
    if not os.path.isdir(os.path.join("/sys/class/net", bridge, "bridge")):
        raise TapError("%s is not an existing bridge (create it with: ip link add %s type bridge; "
                       "ip link set %s up)" % (bridge, bridge, bridge))


def interface_is_up(name):
    """True if the interface is administratively up (IFF_UP in its flags)."""
    try:
        with open(os.path.join("/sys/class/net", name, "flags")) as handle:
            return bool(int(handle.read(), 16) & 0x1)
    except (OSError, ValueError):
        return False


class Tap:
    """A non-persistent tap (IFF_TAP | IFF_NO_PI), up, with its MTU set.

    With `offload`, it is opened with IFF_VNET_HDR and TUNSETOFFLOAD: every frame read or
    written is preceded by a virtio_net_hdr, and reads may return TCP super-frames of up to
    64 KiB (see offload.py). Closing it destroys the interface, wherever it has been moved
    since (another network namespace, a bridge).
    """

    def __init__(self, name=None, mtu=1500, offload=False):
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise TapError("MTU %d is out of range (%d..%d)" % (mtu, MIN_MTU, MAX_MTU))
        if name is not None:
            if not name or len(name) > 15 or "/" in name or "%" in name or name != name.strip() or " " in name:
                raise TapError("invalid interface name %r (1-15 characters, no '/', '%%' or spaces)" % name)
            if os.path.exists(os.path.join("/sys/class/net", name)):
                raise TapError("interface %s already exists" % name)
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0)
        try:
            self._dev = pytun.TunTapDevice(name=name or "tap%d", flags=flags)
        except pytun.Error as err:
            raise TapError(_explain(err, name or "tap%d")) from None
        self.name = self._dev.name
        self._fd = self._dev.fileno()
        try:
            if offload:
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, OFFLOADS)
            self._dev.mtu = mtu
            self._dev.up()
        except OSError as err:  # pytun.Error is an OSError
            self._dev.close()
            raise TapError("cannot configure %s (MTU %d%s): %s"
                           % (self.name, mtu, ", offloads" if offload else "", err.args[-1])) from None
        self.mtu = mtu
        self.offload = offload
        self.read_size = (VNET_HDR_SIZE + max(SUPER_FRAME, mtu + FRAME_OVERHEAD)) if offload \
            else mtu + FRAME_OVERHEAD
        # Non-blocking, so the reader can drain every ready frame into one batch.
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def add_address(self, cidr):
        """Put an IPv4 or IPv6 address (with prefix length) on the tap, with iproute2."""
        self._ip("addr", "add", check_cidr(cidr), "dev", self.name)

    def join_bridge(self, bridge):
        """Make the tap a port of an existing Linux bridge (etherws' br0 setup)."""
        check_bridge(bridge)
        self._ip("link", "set", "dev", self.name, "master", bridge)

    def _ip(self, *args):
        try:
            result = subprocess.run(("ip",) + args, capture_output=True, text=True, timeout=10)
        except FileNotFoundError:
            raise TapError("the ip command (iproute2) is not installed") from None
        if result.returncode != 0:
            raise TapError("ip %s failed: %s" % (" ".join(args), result.stderr.strip()))

    def fileno(self):
        return self._fd

    def read(self):
        """One frame, or None when no frame is ready."""
        try:
            return os.read(self._fd, self.read_size)
        except BlockingIOError:
            return None

    def write(self, frame):
        os.write(self._fd, frame)

    def write_parts(self, parts):
        """One frame from several buffers (a virtio header and a frame) in one system call."""
        os.writev(self._fd, parts)

    def close(self):
        if self._fd is not None:
            self._fd = None
            self._dev.close()
