"""MicroVM support: guest kernel, initramfs, disk images and the VMMs (QEMU, Firecracker)."""
