"""`agentkernel doctor` (what isolation this host offers, and why not the rest) and
`agentkernel setup --microvm` (prepare the guest kernel)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def add_doctor_parser(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what isolation this host offers, and why not the rest")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=cmd_doctor)


def add_setup_parser(sub: Any) -> None:
    st = sub.add_parser("setup", help="prepare optional backends (the microVM guest kernel)")
    st.add_argument("--microvm", action="store_true", required=True,
                    help="fetch and prepare the guest kernel and initramfs for `microvm`")
    st.add_argument("--kernel-deb", metavar="DEB",
                    help="use this linux-image-*.deb instead of downloading Debian's "
                         "cloud kernel with apt-get download")
    st.add_argument("--vmlinux", metavar="FILE",
                    help="use this ELF vmlinux with everything built in (e.g. the "
                         "minimal kernel) instead of Debian's cloud kernel")
    st.add_argument("--force", action="store_true",
                    help="fetch and unpack the kernel again even if it is cached")
    st.add_argument("--no-kvm-probe", action="store_true",
                    help="skip the test boot under KVM (the accelerator is probed later)")
    st.set_defaults(handler=cmd_setup)


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..doctor import doctor

    return doctor(as_json=args.json)


def cmd_setup(args: argparse.Namespace) -> int:
    from ..vm.setup import main as setup_main

    return setup_main(args)
